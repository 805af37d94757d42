"""The training loop every stage shares: AdamW, warmup + cosine, gradient accumulation and clipping,
bf16 autocast where the device computes in bf16, checkpoints in the official safetensors layout with
the trainer's state beside them, exact resume, a progress bar, metrics.jsonl, and under torchrun
either DistributedDataParallel or FSDP (fully_shard per decoder layer: weights, gradients and
optimizer state split across the processes, for models whose optimizer state does not fit one GPU).
The same command runs as one CPU process. A stage supplies a Task: a module whose forward(batch)
returns (loss, tokens), the batches, and how to write its result."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

from hovle_edge.errors import CheckpointError, ConfigError
from hovle_edge.files import atomic_directory, claim_directory
from hovle_edge.model.layers import DecoderLayer

CHECKPOINTS = "checkpoints"
TRAIN_CONFIG = "train_config.json"
PARALLEL = ("ddp", "fsdp")
# Whole (unsharded) tensors on the CPU: what is written to disk and read back, whatever the wrapping.
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def finished(out: str) -> bool:
    """A stage's output is complete once its train_config.json is there."""
    return os.path.isfile(os.path.join(out, TRAIN_CONFIG))


def made_by_training(out: str) -> bool:
    """A finished stage, or one interrupted after a checkpoint (folders from before the output marker)."""
    return finished(out) or latest_checkpoint(out) is not None


def claim_training_output(out: str, inputs=()) -> None:
    """Refuse, before anything loads, an `out` that hovle-edge training did not make or that is, holds
    or sits inside one of `inputs` (the init checkpoint, the data); torchrun's rank 0 checks for all."""
    if int(os.environ.get("RANK", "0")) == 0:
        claim_directory(out, "train", made_by_training, inputs, what="training output")


def inherited(previous: str) -> dict:
    """The previous stage's train_config.json, or {} when it has none."""
    path = os.path.join(previous, TRAIN_CONFIG)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 16  # sequences per process per micro-step
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    warmup: int = 50
    weight_decay: float = 0.0
    clip: float = 1.0
    save_every: int = 0  # 0 saves only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    log_every: int = 10
    parallel: str = "ddp"  # with several processes: "ddp" (replicas) or "fsdp" (sharded)
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto": bf16 where the device computes it natively

    @classmethod
    def from_dict(cls, data: dict) -> "TrainSettings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class Task:
    """What a stage gives the loop. `module` holds every trainable tensor (the model and any helper
    such as a distillation projection); `model` is what the stage produces; `record` goes into the
    output's train_config.json so that the next stage can inherit it."""

    module: torch.nn.Module
    model: torch.nn.Module
    record: dict = {}

    def batch(self, step: int, micro: int, rank: int, world: int, batch_size: int):
        raise NotImplementedError

    def save(self, directory: str, weights: dict) -> None:
        """Write the result; `weights` is the model's whole state dict (gathered under FSDP)."""
        raise NotImplementedError


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warmup to lr, then cosine down to lr * min_lr_ratio at the last step."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


PRECISIONS = ("auto", "bf16", "fp32")


def training_device() -> torch.device:
    """This process's GPU when there is one (torchrun's LOCAL_RANK picks it), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether the device does bf16 arithmetic itself: a GPU, or a CPU with AVX512-BF16 or AMX.
    Elsewhere bf16 is emulated, slower than fp32, so "auto" keeps fp32 there."""
    return device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether to autocast to bf16: "bf16" always, "fp32" never, "auto" where it is native."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return native_bf16(device) if precision == "auto" else precision == "bf16"


def distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def parallelize(module: torch.nn.Module, world: int, parallel: str) -> torch.nn.Module:
    """What the steps run: the module itself on one process, a DDP wrapper, or the module sharded
    in place by fully_shard, one unit per decoder layer and one for the rest."""
    if parallel not in PARALLEL:
        raise ConfigError(f"parallel must be one of {', '.join(PARALLEL)}, not {parallel!r}")
    if world == 1:
        return module
    if parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard

    for layer in [m for m in module.modules() if isinstance(m, DecoderLayer)]:
        fully_shard(layer)
    fully_shard(module)
    return module


def whole_weights(task: Task) -> tuple[dict, dict]:
    """(model weights, helper weights) as whole CPU tensors. A collective under FSDP: every rank calls it."""
    state = get_model_state_dict(task.module, options=FULL)
    model = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return model, {k: v.contiguous() for k, v in state.items() if not k.startswith("model.")}


def train(task: Task, settings: TrainSettings, out: str, desc: str = "train", progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Run (or resume) the stage; rank 0 writes checkpoints under out/checkpoints and the result
    into `out`. `stop_after` ends the run early as an interruption would (for tests). Returns the
    last metrics."""
    claim_training_output(out)  # run_stage has checked it against its inputs already
    rank, world = distributed()
    device = training_device()
    task.module.to(device)
    runner = parallelize(task.module, world, settings.parallel)
    params = [p for p in task.module.parameters() if p.requires_grad]  # sharded ones under FSDP
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95))
    start = resume(task, optimizer, out)
    os.makedirs(out, exist_ok=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(settings.precision, device))
    bar = tqdm(range(start, settings.steps), desc=desc, initial=start, total=settings.steps,
               disable=not progress or rank != 0, dynamic_ncols=True)
    metrics = {}
    for step in bar:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        total_loss, total_tokens = 0.0, 0
        for micro in range(settings.grad_accum):
            batch = to_device(task.batch(step, micro, rank, world, settings.batch_size), device)
            with autocast:
                loss, tokens = runner(batch)
            (loss / settings.grad_accum).backward()
            total_loss += float(loss.detach()) / settings.grad_accum
            total_tokens += int(tokens)
        norm = torch.nn.utils.clip_grad_norm_(params, settings.clip) if settings.clip > 0 else torch.tensor(0.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        metrics = {"step": step + 1, "loss": total_loss, "lr": lr_at(step, settings), "grad_norm": float(norm),
                   "tokens_per_s": total_tokens * world / seconds}
        if rank == 0:
            bar.set_postfix(loss=f"{total_loss:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
                with open(os.path.join(out, "metrics.jsonl"), "a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
        last = step + 1 == settings.steps
        if settings.save_every and (step + 1) % settings.save_every == 0 and not last:
            save_checkpoint(task, optimizer, step + 1, settings, out, rank)
        if stop_after is not None and step + 1 >= stop_after:
            return metrics
    weights, _ = whole_weights(task)
    if rank == 0:
        task.save(out, weights)
        with open(os.path.join(out, TRAIN_CONFIG), "w", encoding="utf-8") as f:  # written last: the stage is done
            json.dump({"stage": desc, "settings": asdict(settings), "metrics": metrics, **task.record}, f, indent=2)
        shutil.rmtree(os.path.join(out, CHECKPOINTS), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return metrics


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def save_checkpoint(task: Task, optimizer, step: int, settings: TrainSettings, out: str, rank: int) -> None:
    """out/checkpoints/step-N: the model in the official layout, helper weights, optimizer, RNG.
    Every rank gathers (FSDP needs all of them); rank 0 writes."""
    weights, helpers = whole_weights(task)
    optimizer_state = get_optimizer_state_dict(task.module, optimizer, options=FULL)
    if rank != 0:
        return
    root = os.path.join(out, CHECKPOINTS)
    with atomic_directory(os.path.join(root, f"step-{step:07d}"), overwrite=True,
                          owned_by=lambda p: os.path.isfile(os.path.join(p, "trainer_state.json"))) as tmp:
        task.save(tmp, weights)
        if helpers:
            save_file(helpers, os.path.join(tmp, "helpers.safetensors"))
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump({"step": step, "settings": asdict(settings), "scheduler": {"lr": lr_at(step - 1, settings)},
                       "files": ["optimizer.pt", "rng.pt"] + (["helpers.safetensors"] if helpers else [])}, f, indent=2)
    kept = sorted(os.listdir(root))
    for old in kept[:-settings.keep_checkpoints]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def latest_checkpoint(out: str) -> str | None:
    root = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    done = sorted(d for d in os.listdir(root) if d.startswith("step-") and
                  os.path.isfile(os.path.join(root, d, "trainer_state.json")))
    return os.path.join(root, done[-1]) if done else None


def resume(task: Task, optimizer, out: str) -> int:
    """Load the last checkpoint under `out`, if any, on every rank (each takes its own shard under
    FSDP); returns the step to continue from."""
    from hovle_edge.model.weights import read_state_dict

    path = latest_checkpoint(out)
    if path is None:
        return 0
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    weights = {f"model.{k}": v for k, v in read_state_dict(path).items()}
    if os.path.isfile(os.path.join(path, "helpers.safetensors")):
        weights.update(load_file(os.path.join(path, "helpers.safetensors")))
    set_model_state_dict(task.module, weights, options=StateDictOptions(full_state_dict=True, strict=True))
    # Not strict: a parameter that never had a gradient (the unused class embedding) has no Adam state.
    set_optimizer_state_dict(task.module, optimizer, load_tensors(os.path.join(path, "optimizer.pt")),
                             options=StateDictOptions(full_state_dict=True, strict=False))
    set_rng_state(load_tensors(os.path.join(path, "rng.pt")), os.path.join(path, "rng.pt"))
    return state["step"]


def load_tensors(path: str):
    """A torch.save file of tensors, numbers, strings and containers only. weights_only=True: a pickle
    planted in a checkpoint cannot run code when a run resumes from it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a trainer state file this version reads ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); remove "
                              f"{os.path.dirname(os.path.dirname(path))} to start the stage over") from e


def rng_state() -> dict:
    """Every generator's state as tensors and plain numbers, which weights_only loading accepts
    (numpy's own state holds an ndarray, which it does not)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
            "python": [version, torch.tensor(words, dtype=torch.int64), gauss_next]}


def set_rng_state(state, path: str) -> None:
    try:
        name, keys, position, has_gauss, gauss = state["numpy"]
        version, words, gauss_next = state["python"]
        torch.set_rng_state(state["torch"])
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        random.setstate((version, tuple(int(w) for w in words.tolist()), gauss_next))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: random generator state not in the form this version writes ({e}); "
                              f"remove {os.path.dirname(os.path.dirname(path))} to start the stage over") from e
