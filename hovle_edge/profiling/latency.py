"""Latency of the real pipeline: run several times with the runtime's own timers, reported per run and
as p50/p90/p99 (image preprocessing, vision graph, embedding and LLM prefill, time to first token,
inter-token latency, decode tokens/s, end to end), with peak host RSS and, on GPU, peak device memory;
sweep tables, and a PNG. Torch-free."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field

import numpy as np

from hovle_edge.errors import InputError
from hovle_edge.profiling.settings import ProfileSettings
from hovle_edge.tokenizer import IM_END, IM_START, Prompt

# (key in a run's record, label in the table); all in milliseconds except tokens/s.
METRICS = [
    ("preprocess_ms", "preprocess"),
    ("vision_ms", "vision graph"),
    ("embedding_prefill_ms", "embedding prefill"),
    ("llm_prefill_ms", "LLM prefill"),
    ("ttft_ms", "time to first token"),
    ("itl_ms", "inter-token latency"),
    ("decode_tokens_per_s", "decode tokens/s"),
    ("e2e_ms", "end to end"),
]


def percentiles(values) -> dict:
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(values.mean())}


@dataclass
class ProfileReport:
    settings: dict
    runs: list = field(default_factory=list)  # one record per measured run, every raw timing in it
    peak_rss_mb: float = 0.0
    peak_device_mb: float | None = None

    def summary(self) -> dict:
        out = {}
        for key, _ in METRICS:
            if key == "itl_ms":  # every decode step of every run
                out[key] = percentiles(v for run in self.runs for v in run["step_ms"])
            else:
                out[key] = percentiles(run[key] for run in self.runs)
        return out

    def table(self) -> str:
        s = self.settings
        head = (f"model {s['model']} | {s['backend']} on {s['device']} | tiles {s['tiles']} | prompt tokens "
                f"{s['prompt_tokens']} (+{s['image_tokens']} image) | new tokens {s['new_tokens']} | runs {s['runs']}")
        lines = [head, f"{'metric':<22}{'p50':>12}{'p90':>12}{'p99':>12}"]
        summary = self.summary()
        for key, label in METRICS:
            row = summary[key]
            unit = "" if key.endswith("per_s") else " ms"
            cells = "".join(f"{'-' if row[p] is None else f'{row[p]:.2f}':>12}" for p in ("p50", "p90", "p99"))
            lines.append(f"{label + unit:<22}{cells}")
        device = "" if self.peak_device_mb is None else f", peak device memory {self.peak_device_mb:.0f} MB"
        lines.append(f"peak host RSS {self.peak_rss_mb:.0f} MB{device}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"settings": self.settings, "summary": self.summary(), "runs": self.runs,
                "peak_rss_mb": self.peak_rss_mb, "peak_device_mb": self.peak_device_mb}


def record(timings) -> dict:
    """One run's timings in milliseconds, the raw per-step latencies included."""
    decode_seconds = sum(timings.steps)
    return {
        "preprocess_ms": 1000 * timings.preprocess, "vision_ms": 1000 * timings.vision,
        "embedding_prefill_ms": 1000 * timings.embedding_prefill, "llm_prefill_ms": 1000 * timings.llm_prefill,
        "ttft_ms": 1000 * timings.first_token, "e2e_ms": 1000 * timings.total,
        "decode_tokens_per_s": len(timings.steps) / decode_seconds if decode_seconds else 0.0,
        "step_ms": [1000 * s for s in timings.steps], "new_tokens": timings.new_tokens,
        "prompt_tokens": timings.prompt_tokens, "tiles": timings.tiles,
    }


def peak_rss_mb() -> float:
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / 1024 if sys.platform != "darwin" else kilobytes / 2**20  # macOS reports bytes


def device_memory_mb() -> float | None:
    """Memory in use on GPU 0 by NVML, when nvidia-ml-py is installed and a GPU is there."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 2**20
    except Exception:  # no library, no driver or no GPU: there is nothing to report
        return None


def prompt_ids(pipe, prompt_tokens: int, tiles: int) -> list[int]:
    """A templated prompt with exactly `prompt_tokens` text tokens around the image block."""
    tokenizer, template = pipe.tokenizer, pipe.template
    head = tokenizer.encode(template.system_block() + Prompt.trusted(f"{IM_START}user\n") + template.with_image("", tiles),
                            bos=True)
    tail = tokenizer.encode(Prompt.trusted(f"{IM_END}{IM_START}assistant\n"))
    image_tokens = tiles * template.tokens_per_tile
    filler = prompt_tokens - (len(head) - image_tokens) - len(tail)
    if filler < 1:
        raise InputError(f"a prompt of {prompt_tokens} tokens is shorter than the template itself "
                         f"({len(head) - image_tokens + len(tail) + 1} tokens)", setting="prompt_tokens")
    word = tokenizer.encode(" the")[-1]
    return head + [word] * filler + tail


def check_before_loading(settings: ProfileSettings) -> None:
    """The errors that depend only on the settings, the manifest and the tokenizer, raised before any
    graph is opened (a 2.6B folder takes half a minute to load); for each value of a sweep."""
    from hovle_edge.runtime.pipeline import Pipeline
    from hovle_edge.spec import load_manifest
    from hovle_edge.tokenizer import Tokenizer

    model_dir, image = settings.model_dir, settings.image
    inputs = Pipeline(load_manifest(model_dir, verify=False), None, Tokenizer.from_dir(model_dir))  # no backend: no graphs
    for one in settings.swept():
        tile_count = len(inputs.pixel_values(image, None)) if image is not None else (one.tiles or 0)
        try:
            prompt_ids(inputs, one.prompt_tokens, tile_count)
        except InputError as e:
            if not settings.sweep:
                raise
            raise InputError(f"sweep {settings.sweep!r}: {e}", setting="sweep") from e


def profile(pipe, settings: ProfileSettings, seed: int = 0) -> ProfileReport:
    """Run the pipeline `warmup + runs` times; greedy, exactly `new_tokens` generated per run."""
    image, tiles, prompt_tokens, new_tokens = settings.image, settings.tiles, settings.prompt_tokens, settings.new_tokens
    runs, warmup, device = settings.runs, settings.warmup, settings.device
    size = pipe.manifest.model["image_size"]
    tile_count = len(pipe.pixel_values(image, None)) if image is not None else (tiles or 0)
    random_tiles = None
    if image is None and tile_count:  # the vision graph's cost does not depend on the pixels
        random_tiles = np.random.default_rng(seed).standard_normal((tile_count, 3, size, size)).astype(np.float32)
    ids = prompt_ids(pipe, prompt_tokens, tile_count)
    report = ProfileReport(settings={"model": settings.model_dir, "backend": settings.backend, "device": device,
                                     "tiles": tile_count, "prompt_tokens": prompt_tokens,
                                     "image_tokens": tile_count * pipe.template.tokens_per_tile, "new_tokens": new_tokens,
                                     "runs": runs, "warmup": warmup, "image": None if image is None else str(image)})
    for index in range(warmup + runs):
        chat = pipe.conversation()
        chat.ask_ids(ids, random_tiles, image=image, stop_ids=(), max_new_tokens=new_tokens)
        if device != "cpu":
            used = device_memory_mb()
            if used is not None:
                report.peak_device_mb = max(report.peak_device_mb or 0.0, used)
        if index >= warmup:
            report.runs.append(record(chat.timings))
    report.peak_rss_mb = peak_rss_mb()
    return report


def sweep_table(key: str, values: list[int], reports: list[ProfileReport]) -> str:
    lines = [f"{key:>14}{'TTFT p50 ms':>14}{'ITL p50 ms':>13}{'ITL p90 ms':>13}{'decode tok/s':>14}{'e2e p50 ms':>13}"]
    for value, report in zip(values, reports):
        s = report.summary()
        lines.append(f"{value:>14}{s['ttft_ms']['p50']:>14.2f}{s['itl_ms']['p50']:>13.3f}{s['itl_ms']['p90']:>13.3f}"
                     f"{s['decode_tokens_per_s']['p50']:>14.1f}{s['e2e_ms']['p50']:>13.1f}")
    return "\n".join(lines)


def plot(path: str, report: ProfileReport | None = None, sweep: tuple[str, list[int], list] | None = None) -> None:
    """A PNG: per-token latency over the generation and the time-to-first-token breakdown, or for a
    sweep, how latency grows with the work."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError("a plot needs matplotlib: pip install 'hovle-edge[plot]'", setting="plot_path") from e
    from hovle_edge.files import atomic_file

    if sweep is not None:
        key, values, reports = sweep
        figure, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].plot(values, [r.summary()["ttft_ms"]["p50"] for r in reports], marker="o")
        axes[0].set(xlabel=key, ylabel="ms", title="time to first token (p50)")
        axes[1].plot(values, [r.summary()["itl_ms"]["p50"] for r in reports], marker="o", label="p50")
        axes[1].plot(values, [r.summary()["itl_ms"]["p90"] for r in reports], marker="x", label="p90")
        axes[1].set(xlabel=key, ylabel="ms", title="inter-token latency")
        axes[1].legend()
    else:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
        for i, run in enumerate(report.runs):
            axes[0].plot(range(1, len(run["step_ms"]) + 1), run["step_ms"], lw=1, label=f"run {i + 1}")
        axes[0].set(xlabel="generated token", ylabel="ms", title="per-token latency")
        if len(report.runs) <= 8:
            axes[0].legend(fontsize=7)
        summary = report.summary()
        bottom = 0.0
        for key, label in METRICS[:4]:
            height = summary[key]["p50"] or 0.0
            axes[1].bar(["TTFT p50"], [height], bottom=bottom, label=label)
            bottom += height
        axes[1].set(ylabel="ms", title="time to first token")
        axes[1].legend(fontsize=7)
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
