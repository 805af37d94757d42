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


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, file_okay=False),
              help="Checkpoint folder: config.json, safetensors weights, tokenizer files.")
@click.option("--out", required=True, type=click.Path(), help="Model folder to write (appears only if every check passes).")
@click.option("--dtype", "precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of weights, activations and KV cache; logits are always fp32.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18, which TensorRT 10.3 parses; 23 adds fused ops).")
@click.option("--max-context", type=int, default=None, help="Longest conversation in tokens (default: the LLM's max positions).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export(checkpoint, out, precision, opset, max_context, overwrite):
    """Export a checkpoint to vision.onnx, embedding.onnx and decoder.onnx plus manifest.json.

    Each graph is compared with PyTorch on ONNX Runtime before the folder is moved into place.
    """
    from hovle_edge.export import DEFAULT_OPSET, export_model

    manifest = export_model(checkpoint, out, precision=precision, opset=opset or DEFAULT_OPSET,
                            max_context=max_context, overwrite=overwrite)
    for name, graph in manifest.data["graphs"].items():
        click.echo(f"{name:<10} {graph['bytes'] / 2**20:9.1f} MiB  parity max abs {graph['parity']['max_abs']:.2g}")
    click.echo(f"wrote {out}")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="A real image to check with (default: a drawn one).")
@click.option("--prompt", default="What is in the image?", show_default=True)
@click.option("--new-tokens", type=int, default=32, show_default=True)
def verify(checkpoint, model_dir, image, prompt, new_tokens):
    """Compare an exported model folder with its PyTorch checkpoint; exit 1 past the tolerance."""
    from hovle_edge.export.verify import verify_model

    report = verify_model(checkpoint, model_dir, image=image, prompt=prompt, new_tokens=new_tokens)
    click.echo(report.table())
    sys.exit(0 if report.ok else 1)


def sampling_options(command):
    """The generation options shared by run, chat and profile."""
    options = [
        click.option("--max-new-tokens", type=int, default=256, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 keeps every token."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def backend_options(command):
    options = [
        click.option("--model", "model_dir", required=True, type=click.Path(), help="A folder made by `hovle-edge export`."),
        click.option("--backend", type=click.Choice(["onnxruntime"]), default="onnxruntime", show_default=True),
        click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True),
        click.option("--threads", type=int, default=None, help="CPU threads for the backend (default: all cores)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@backend_options
@click.option("--prompt", required=True, help="The question; `<image>` marks where the image goes.")
@click.option("--image", type=click.Path(dir_okay=False), default=None)
@click.option("--max-tiles", type=int, default=None, help="At most this many image tiles (default: the model's).")
@click.option("--stream/--no-stream", default=True, show_default=True)
@sampling_options
def run(model_dir, backend, device, threads, prompt, image, max_tiles, stream, **sampling):
    """Answer one question, optionally about an image, without torch."""
    from hovle_edge.runtime import Pipeline

    with Pipeline.from_dir(model_dir, backend=backend, device=device, threads=threads) as pipe:
        if stream:
            for piece in pipe.stream(prompt, image, max_tiles=max_tiles, **sampling):
                click.echo(piece, nl=False)
            click.echo()
        else:
            click.echo(pipe.generate(prompt, image, max_tiles=max_tiles, **sampling))


@main.command()
@backend_options
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="An image for the first question.")
@sampling_options
def chat(model_dir, backend, device, threads, image, **sampling):
    """Chat in the terminal; the conversation's KV caches are kept between turns.

    Commands: /image PATH (for the next question), /reset, /exit.
    """
    from hovle_edge.runtime import Pipeline
    from hovle_edge.runtime.chat import chat_loop

    with Pipeline.from_dir(model_dir, backend=backend, device=device, threads=threads) as pipe:
        chat_loop(pipe, image, sampling, read=lambda: click.prompt("you", prompt_suffix="> ", default="",
                                                                   show_default=False), write=click.echo)
