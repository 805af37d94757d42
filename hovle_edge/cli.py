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
