"""The `hovle-edge` command. Each command parses its options and calls one library function;
heavy imports happen inside the command so that `--help` and the runtime stay torch-free."""

from __future__ import annotations

import json
import math
import os
import sys

import click

from hovle_edge import __version__
from hovle_edge.errors import HoVLEError


class Command(click.Command):
    """Reports a library error about one setting as a bad value of the option that set it: the library
    names the setting by its parameter name (`HoVLEError.setting`) and never knows the command line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HoVLEError as e:
            option = next((p for p in self.params if e.setting and p.name == e.setting), None)
            if option is None:
                raise
            raise click.BadParameter(str(e), ctx, option) from e


class Group(click.Group):
    """Turns hovle-edge's own errors into one clear line and exit code 2 instead of a traceback."""

    command_class = Command
    group_class = type  # subgroups (train, shapes) are Groups too, so their commands are Commands

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HoVLEError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except click.BadParameter as e:  # a value out of range: one line, like our own errors
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(2)


class Finite(click.ParamType):
    """A float that is finite (click's FloatRange lets NaN through) and above `low` (or at it, when
    `low_open` is false) and at most `high`."""

    name = "number"

    def __init__(self, low: float = 0.0, high: float = float("inf"), low_open: bool = False):
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value, param, ctx):
        number = value if isinstance(value, float) else click.FLOAT.convert(value, param, ctx)
        above = number > self.low if self.low_open else number >= self.low
        if not math.isfinite(number) or not above or number > self.high:
            bound = f"{'>' if self.low_open else '>='} {self.low:g}" + (f" and <= {self.high:g}" if self.high < float("inf") else "")
            self.fail(f"{value!r} is not a finite number {bound}", param, ctx)
        return number


POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)


def in_existing_folder(ctx, param, path):
    """A file to write: its folder must exist before any work is done."""
    if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise click.BadParameter(f"{path}: the folder {os.path.dirname(os.path.abspath(path))} does not exist",
                                 ctx, param)
    return path


@click.group(cls=Group)
@click.version_option(__version__)
def main():
    """hovle-edge: HoVLE from PyTorch to edge GPUs.

    \b
    In the order the data flows:
      demo, shapes         the whole method end to end on a synthetic world, and its parts
      train                the paper's three stages: distill, align, instruct
      convert-tokenizer    a tokenizer.json that the torch-free runtime reads
      export, verify       ONNX graphs, checked against the PyTorch checkpoint
      quantize             weight-only INT4/INT8 of an exported folder
      build                TensorRT engines from an exported folder
      run, chat, serve     answers without torch (one question, the terminal, an HTTP API)
      profile              latency by stage and the memory-bandwidth bound on decode

    `hovle-edge COMMAND --help` describes each.
    """


@main.command("convert-tokenizer")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def convert_tokenizer(directory):
    """Write DIRECTORY/tokenizer.json from its tokenizer.model (+ added_tokens.json), so that the
    runtime needs only the `tokenizers` library. DIRECTORY: a checkpoint or tokenizer folder."""
    from hovle_edge.tokenizer import convert_tokenizer as convert

    click.echo(f"wrote {convert(directory)}")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, file_okay=False),
              help="Checkpoint folder: config.json, safetensors weights, tokenizer files.")
@click.option("--out", required=True, type=click.Path(), help="Model folder to write (appears only if every check passes).")
@click.option("--dtype", "precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of weights, activations and KV cache; logits are always fp32.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18, which TensorRT 10.3 parses; 23 adds fused ops).")
@click.option("--max-context", type=POSITIVE, default=None, help="Longest conversation in tokens (default: the LLM's max positions).")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="onnxruntime: ORT's fused ops, KV caches written in place; tensorrt: standard ops that `build` compiles.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if hovle-edge exported it; never a folder that is, holds or sits inside the checkpoint.")
def export(checkpoint, out, precision, opset, max_context, target, overwrite):
    """Export a checkpoint to vision.onnx, embedding.onnx and decoder.onnx plus manifest.json.

    Each graph is compared with PyTorch on ONNX Runtime before the folder is moved into place.
    """
    from hovle_edge.export import DEFAULT_OPSET, export_model

    manifest = export_model(checkpoint, out, precision=precision, opset=opset or DEFAULT_OPSET,
                            max_context=max_context, overwrite=overwrite, target=target)
    for name, graph in manifest.data["graphs"].items():
        click.echo(f"{name:<10} {graph['bytes'] / 2**20:9.1f} MiB  parity max abs {graph['parity']['max_abs']:.2g}")
    click.echo(f"wrote {out}")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, file_okay=False),
              help="The PyTorch checkpoint folder the model was exported from.")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The folder `hovle-edge export` wrote from it.")
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="A real image to check with (default: a drawn one).")
@click.option("--prompt", default="What is in the image?", show_default=True, help="The question the logits are compared on.")
@click.option("--new-tokens", type=POSITIVE, default=8, show_default=True,
              help="Greedy steps of PyTorch decoded by the runtime, every step's logits compared.")
def verify(checkpoint, model_dir, image, prompt, new_tokens):
    """Compare an exported model folder with its PyTorch checkpoint; exit 1 past the tolerance.

    Checks each graph on random inputs (batch 2 with left padding, then a decode step on the cache it
    wrote), then end to end through the runtime: the image rows, the prompt's logits, and PyTorch's
    greedy tokens fed to the runtime one decode step at a time (teacher-forced: both sides do the same
    work, and every step's logits are compared). fp32 must also choose PyTorch's token at every step.
    """
    from hovle_edge.export.verify import verify_model

    report = verify_model(checkpoint, model_dir, image=image, prompt=prompt, new_tokens=new_tokens)
    click.echo(report.table())
    sys.exit(0 if report.ok else 1)


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A float folder made by `hovle-edge export`.")
@click.option("--out", required=True, type=click.Path(), help="Quantized model folder to write (appears whole or not at all).")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True, help="Bits per weight.")
@click.option("--group-size", type=int, default=128, show_default=True, help="Input rows per scale (a power of two >= 16 dividing every width).")
@click.option("--method", type=click.Choice(["rtn", "awq"]), default="rtn", show_default=True,
              help="rtn: round to nearest; awq: activation-aware scales searched on calibration prompts.")
@click.option("--calibration", type=click.Path(exists=True, file_okay=False), default=None,
              help="A folder with prompts.jsonl (and its images); default: the shapes world.")
@click.option("--quantize-head", is_flag=True, help="Quantize the output head too (embeddings always stay float).")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="onnxruntime: MatMulNBits; tensorrt: DequantizeLinear INT4/INT8 -> MatMul (opset 21).")
@click.option("--held-out", type=int, default=16, show_default=True, help="Held-out prompts for the agreement check (0: skip).")
@click.option("--accuracy-level", type=click.Choice(["0", "4"]), default="0", show_default=True,
              help="MatMulNBits: 0 computes in float; 4 rounds activations to int8 (about 3x fp32 decode on CPU for int4).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def quantize(model_dir, out, bits, group_size, method, calibration, quantize_head, target, held_out, accuracy_level,
             overwrite):
    """Weight-only INT4/INT8 quantization of an exported folder; reports top-1 agreement and mean KL
    against it on held-out prompts (a quantized folder cannot be bit-exact, so `verify` does not apply)."""
    from hovle_edge.quantize import QuantizeSettings, quantize_model

    settings = QuantizeSettings(bits=int(bits), group_size=group_size, method=method, target=target,
                                quantize_head=quantize_head, calibration=calibration, held_out_prompts=held_out,
                                accuracy_level=int(accuracy_level))
    quantize_model(model_dir, out, settings, overwrite=overwrite, log=click.echo)
    click.echo(f"wrote {out}")


def sampling_options(command):
    """The generation options shared by run, chat and profile."""
    options = [
        click.option("--max-new-tokens", type=POSITIVE, default=256, show_default=True,
                     help="Most tokens to generate per answer (a stop token ends it sooner)."),
        click.option("--temperature", type=Finite(0.0), default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-k", type=NON_NEGATIVE, default=0, show_default=True, help="0 keeps every token."),
        click.option("--top-p", type=Finite(0.0, 1.0, low_open=True), default=1.0, show_default=True,
                     help="Sample from the most likely tokens whose probabilities add up to this (1 keeps every token)."),
        click.option("--repetition-penalty", type=Finite(0.0, low_open=True), default=1.0, show_default=True,
                     help="Makes tokens already seen less likely (positive logits divided by it, negative ones multiplied); 1 is off."),
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None,
                     help="Seed of the sampler: the same seed gives the same text (default: a fresh one)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


BACKEND_HELP = "tensorrt runs engines from `hovle-edge build` (then --device cuda)."
DEVICE_HELP = ("onnxruntime's execution provider: cpu, cuda, or tensorrt (ONNX Runtime's TensorRT provider, "
               "CUDA for what it does not take); the tensorrt backend takes cuda.")
THREADS_HELP = "CPU threads for the backend (default: all cores)."


def backend_options(command):
    """The model and backend options shared by run, chat and serve."""
    options = [
        click.option("--model", "model_dir", required=True, type=click.Path(), help="A folder made by `hovle-edge export`."),
        click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
                     help=BACKEND_HELP),
        click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
                     help=DEVICE_HELP),
        click.option("--threads", type=POSITIVE, default=None, help=THREADS_HELP),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@backend_options
@click.option("--prompt", required=True, help="The question; `<image>` marks where the image goes.")
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="An image the question is about.")
@click.option("--max-tiles", type=POSITIVE, default=None, help="At most this many image tiles (default: the model's).")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Print tokens as they are generated, or the whole answer at the end.")
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


def train_options(command):
    """Settings of the shared training loop; unset ones come from the previous stage or the defaults."""
    options = [
        click.option("--steps", type=int, default=None, help="Optimizer steps."),
        click.option("--batch-size", type=int, default=None, help="Sequences per process per micro-step."),
        click.option("--grad-accum", type=int, default=None, help="Micro-steps whose gradients add up to one step."),
        click.option("--lr", type=float, default=None, help="Peak learning rate of AdamW, reached after --warmup steps, then cosine decay."),
        click.option("--warmup", type=int, default=None, help="Steps of linear warmup to --lr."),
        click.option("--clip", type=float, default=None, help="Gradient norm clip (0: off)."),
        click.option("--save-every", type=int, default=None, help="Checkpoint every N steps (a rerun resumes from the last)."),
        click.option("--seed", type=int, default=None, help="Seed of the data order and of fresh weights."),
        click.option("--parallel", type=click.Choice(["ddp", "fsdp"]), default=None,
                     help="Under torchrun: ddp keeps a whole replica per process; fsdp shards weights, gradients "
                          "and optimizer state (for the 2.6B model on GPUs that cannot hold it all). Default ddp."),
        click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default=None,
                     help="bf16 autocast or fp32. Default auto: bf16 on a GPU and on a CPU with native bf16 "
                          "(AVX512-BF16 or AMX), fp32 elsewhere."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.group()
def train():
    """Train HoVLE in the paper's three stages (distill, align, instruct).

    Runs on one CPU process as it is, or on many GPUs and nodes under
    `torchrun --nproc_per_node N -m hovle_edge.cli train ...` (DistributedDataParallel,
    or FSDP with --parallel fsdp).
    """


@train.command("distill")
@click.option("--init", required=True, type=click.Path(exists=True, file_okay=False),
              help="A HoVLE checkpoint, or an InternLM2 folder to put a fresh holistic embedding in front of.")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="A folder of images.")
@click.option("--teacher", required=True, type=click.Path(exists=True, file_okay=False),
              help="A vision model folder: the shapes teacher or a Hugging Face vision model.")
@click.option("--text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A text file for the text tokens (default: random token sequences).")
@click.option("--held-out", type=click.Path(exists=True, file_okay=False), default=None,
              help="Images to report the mean cosine to the teacher on.")
@click.option("--embedding-layers", type=int, default=None, help="Layers of a fresh holistic embedding.")
@click.option("--image-size", type=int, default=None, help="Tile size of a fresh holistic embedding.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The checkpoint folder to write.")
@train_options
def train_distill(init, data, teacher, text, held_out, embedding_layers, image_size, out, **settings):
    """Stage 1: only the holistic embedding trains, pulled to the teacher and the LLM's embeddings."""
    from hovle_edge.train.stages import run_stage

    embedding = {k: v for k, v in (("num_hidden_layers", embedding_layers), ("image_size", image_size)) if v}
    click.echo(json.dumps(run_stage("distill", init, out, data=data, overrides=settings, teacher=teacher, text=text,
                                    embedding=embedding, held_out=held_out), indent=2))


def supervised_command(stage: str, doc: str):
    @train.command(stage, help=doc)
    @click.option("--init", required=True, type=click.Path(exists=True, file_okay=False),
                  help="The previous stage's output folder.")
    @click.option("--data", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="JSONL records (default: the previous stage's data when it was this stage).")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="The checkpoint folder to write.")
    @train_options
    def command(init, data, out, **settings):
        from hovle_edge.train.stages import run_stage

        click.echo(json.dumps(run_stage(stage, init, out, data=data, overrides=settings), indent=2))

    return command


supervised_command("align", "Stage 2: holistic embedding + frozen LLM, next-token loss on image-caption JSONL "
                            "({\"image\": path, \"text\": caption}).")
supervised_command("instruct", "Stage 3: the whole model on conversation JSONL (InternVL/LLaVA format), loss on "
                               "the assistant's tokens only.")


@main.group()
def shapes():
    """The synthetic shapes world: data, the teacher and the language model stand-ins."""


@shapes.command("pretrain-teacher")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The teacher's folder to write.")
@click.option("--steps", type=int, default=None, help="Training steps  [default: the demo's]")
def shapes_teacher(out, steps):
    """Train the tiny vision encoder that plays InternViT, on scene attributes."""
    from dataclasses import replace

    from hovle_edge.shapes.teacher import TEACHER_DEFAULTS, pretrain_teacher

    accuracy = pretrain_teacher(out, TEACHER_DEFAULTS if steps is None else replace(TEACHER_DEFAULTS, steps=steps))
    click.echo("accuracy on the things of fresh scenes: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in accuracy.items()))


@shapes.command("pretrain-lm")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The LM's folder to write (an InternLM2-style checkpoint with its tokenizer).")
@train_options
def shapes_lm(out, **settings):
    """Train the world's tokenizer and the tiny InternLM2-style LM that plays InternLM2."""
    from hovle_edge.shapes.lm import LM_DEFAULTS, pretrain_lm
    from hovle_edge.train.loop import TrainSettings

    base = dict(vars(LM_DEFAULTS))
    base.update({k: v for k, v in settings.items() if v is not None})
    click.echo(json.dumps(pretrain_lm(out, TrainSettings.from_dict(base)), indent=2))


@shapes.command("data")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The folder to write: data.jsonl and images.")
@click.option("--kind", type=click.Choice(["caption", "chat"]), required=True,
              help="caption: image-caption records (stage 2); chat: conversations (stage 3).")
@click.option("--count", type=int, default=1000, show_default=True, help="Records to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the scenes: the same seed, the same data.")
def shapes_data(out, kind, count, seed):
    """Write COUNT records of image-caption or conversation JSONL with their images."""
    from hovle_edge.shapes.world import write_dataset

    click.echo(f"wrote {write_dataset(out, kind, count, seed)}")


@main.command()
@click.option("--out", default="hovle-demo", show_default=True, type=click.Path(file_okay=False),
              help="Work folder; a second run reuses what is there.")
@click.option("--quick", is_flag=True, help="A shortened run (a minute) that checks the path, not the accuracy.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Draws the training data and starts every model; the questions scored stay the same.")
def demo(out, quick, seed):
    """Train the shapes model (teacher, LM, three stages), export it to ONNX and answer questions on
    fresh scenes through the torch-free runtime; prints accuracy and latency, writes report.json."""
    from hovle_edge.shapes.demo import DemoPlan, run_demo

    report = run_demo(out, DemoPlan.quick(seed) if quick else DemoPlan.for_this_machine(seed))
    click.echo(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=2))
    click.echo(f"accuracy {report['accuracy']:.1f}% on {report['questions']} questions; report in "
               f"{os.path.join(out, 'report.json')}")



@main.command()
@click.option("--model", "model_dir", type=click.Path(), default=None, help="A folder made by `hovle-edge export`.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help=BACKEND_HELP)
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help=DEVICE_HELP)
@click.option("--threads", type=POSITIVE, default=None, help=THREADS_HELP)
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="Profile with this image (preprocessing timed).")
@click.option("--tiles", type=POSITIVE, default=None, help="Or: this many random tiles through the vision graph.")
@click.option("--prompt-tokens", type=POSITIVE, default=128, show_default=True, help="Text tokens of the prompt.")
@click.option("--new-tokens", type=POSITIVE, default=64, show_default=True, help="Tokens generated per run (stop tokens ignored).")
@click.option("--runs", type=POSITIVE, default=5, show_default=True, help="Measured runs (percentiles are over these).")
@click.option("--warmup", type=NON_NEGATIVE, default=1, show_default=True, help="Runs before them, not measured.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=in_existing_folder,
              help="Write every raw timing here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, callback=in_existing_folder,
              help="Write a PNG here (needs matplotlib).")
@click.option("--sweep", default=None, help="prompt-tokens=128,512,2048 or tiles=1,4,12 or new-tokens=...")
@click.option("--roofline-only", is_flag=True, help="Only the decode bound from the model's numbers; runs nothing.")
@click.option("--device-model", default=None, help="A device for the roofline: orin-nano, orin-nx, orin-agx, thor, "
                                                   "rtx4090, h100, h200 or all (default all).")
@click.option("--preset", default=None, help="With --roofline-only and no --model: a config preset (hovle-2.6b).")
@click.option("--contexts", default="128,512,2048", show_default=True, help="Contexts for --roofline-only.")
def profile(contexts, **options):
    """Measure latency on the real pipeline (p50/p90/p99 of every stage) and place decode speed on
    a memory-bandwidth roofline; `--roofline-only` sizes an edge device with no GPU present."""
    from hovle_edge.profiling import ProfileSettings, run_profile

    try:
        context_list = tuple(int(c) for c in contexts.split(","))
    except ValueError:
        raise click.BadParameter("whole numbers separated by commas", param_hint="--contexts")
    click.echo(run_profile(ProfileSettings(contexts=context_list, **options)))


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A folder made by `hovle-edge export`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The engine folder to write.")
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="fp16 by builder flag on TensorRT 10; strongly typed builds (11, RTX) take the export's precision.")
@click.option("--max-context", type=POSITIVE, default=None, help="Longest conversation (default: the export's).")
@click.option("--max-prompt", type=POSITIVE, default=None, help="Longest prefill (default: the context).")
@click.option("--max-tiles", type=POSITIVE, default=None, help="Most image tiles at once (default: the model's, with thumbnail).")
@click.option("--max-batch", type=POSITIVE, default=1, show_default=True, help="Most conversations in one call.")
@click.option("--compute-capability", "compute_capabilities", multiple=True, metavar="MAJOR.MINOR",
              help="tensorrt-rtx: build ahead of time, with no GPU needed, for this GPU architecture (8.9 Ada, "
                   "12.0 Blackwell; repeat for several). Default: the GPU's own.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Read and update this timing cache (tensorrt; tensorrt-rtx keeps a runtime cache beside the engines).")
@click.option("--workspace", type=float, default=4.0, show_default=True, help="Builder workspace in GiB.")
@click.option("--flavour", type=click.Choice(["tensorrt", "tensorrt-rtx"]), default=None,
              help="Default: the one installed.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if hovle-edge built it; never a folder that is, holds or sits inside MODEL.")
def build(model_dir, out, precision, max_context, max_prompt, max_tiles, max_batch, compute_capabilities, timing_cache,
          workspace, flavour, overwrite):
    """Build one TensorRT engine per graph with decode, prefill and extend profiles (tensorrt on the
    GPU that will run them; tensorrt-rtx also ahead of time, without a GPU, for --compute-capability).
    Unchanged graphs come from the engine cache."""
    from hovle_edge.engines.builder import build_engines

    record = build_engines(model_dir, out, precision=precision, max_context=max_context, max_prompt=max_prompt,
                           max_tiles=max_tiles, max_batch=max_batch, compute_capabilities=compute_capabilities,
                           timing_cache=timing_cache, workspace_gib=workspace, flavour=flavour, overwrite=overwrite,
                           log=click.echo)
    for graph, entry in record["engines"].items():
        click.echo(f"{graph:<10} {entry['build_seconds']:8.1f} s {entry['bytes'] / 2**20:8.2f} MiB  "
                   f"profiles {', '.join(p['name'] for p in entry['profiles'])}")
    built_on = record["gpu"] or "ahead of time, no GPU"
    click.echo(f"wrote {out} ({record['flavour']} {record['tensorrt_version']}, {built_on}, compute capability "
               f"{', '.join(record['compute_capabilities'])})")


@main.command()
@backend_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback by default; 0.0.0.0 serves the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port to listen on.")
@click.option("--api-key", default=None, help="Require `Authorization: Bearer KEY` on /v1/* (default: none).")
@click.option("--model-name", default=None, help="The model id clients send (default: the model folder's name).")
@click.option("--allow-local-images", type=click.Path(exists=True, file_okay=False), default=None,
              help="Also accept image URLs that are file paths inside this folder (default: data: URLs only).")
@click.option("--slots", type=click.IntRange(min=1), default=4, show_default=True,
              help="Conversations decoded in turn; further requests wait in the queue.")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Waiting requests beyond this get 503.")
@click.option("--cache-mb", type=click.FloatRange(min=0), default=256, show_default=True,
              help="Memory for KV snapshots of earlier prompts (the prefix cache); 0 turns it off.")
@click.option("--image-cache-mb", type=click.FloatRange(min=0), default=64, show_default=True,
              help="Memory for vision outputs by image hash.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=20, show_default=True,
              help="Larger request bodies get 413.")
@click.option("--max-image-mb", type=click.FloatRange(min=0, min_open=True), default=10, show_default=True,
              help="Larger images (encoded bytes) get 413.")
def serve(model_dir, backend, device, threads, host, port, api_key, model_name, allow_local_images, slots, max_queue,
          cache_mb, image_cache_mb, max_body_mb, max_image_mb):
    """Serve the model over an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models,
    GET /health); needs the [serve] extra."""
    from hovle_edge.serve import ServeSettings, serve as run_server

    run_server(ServeSettings(model_dir=model_dir, host=host, port=port, api_key=api_key, model_name=model_name,
                             backend=backend, device=device, threads=threads, allow_local_images=allow_local_images,
                             slots=slots, max_queue=max_queue, cache_mb=cache_mb, image_cache_mb=image_cache_mb,
                             max_body_mb=max_body_mb, max_image_mb=max_image_mb))


if __name__ == "__main__":  # for `torchrun -m hovle_edge.cli ...`
    main()
