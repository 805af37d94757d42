"""The `hovle-edge` command. Each command parses its options and calls one library function;
heavy imports happen inside the command so that `--help` and the runtime stay torch-free."""

from __future__ import annotations

import sys

import click

from hovle_edge import __version__
from hovle_edge.errors import HoVLEError


class Group(click.Group):
    """Turns hovle-edge's own errors into one clear line and exit code 2 instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HoVLEError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=Group)
@click.version_option(__version__)
def main():
    """hovle-edge: HoVLE from PyTorch to edge GPUs.

    Train (train, shapes), export to ONNX (export, verify), build TensorRT engines (build), and run
    on device without torch (run, chat, profile).
    """


@main.command("convert-tokenizer")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def convert_tokenizer(directory):
    """Write DIRECTORY/tokenizer.json from its tokenizer.model (+ added_tokens.json), so that the
    runtime needs only the `tokenizers` library."""
    from hovle_edge.tokenizer import convert_tokenizer as convert

    click.echo(f"wrote {convert(directory)}")
