"""What a profile is asked to measure, as one dataclass: `hovle-edge profile` builds it from its options
and the library takes it whole. What can be checked from the settings alone is checked when they are
made, before any model loads; each error names the field at fault (`setting`), which the CLI turns into
its option. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hovle_edge.errors import InputError

# A sweep's name -> the field it varies.
SWEEPABLE = {"prompt-tokens": "prompt_tokens", "tiles": "tiles", "new-tokens": "new_tokens"}


def parse_sweep(text: str) -> tuple[str, list[int]]:
    """"prompt-tokens=128,512,2048" -> ("prompt-tokens", [128, 512, 2048])."""
    key, _, values = text.partition("=")
    if key not in SWEEPABLE or not values:
        raise InputError(f"sweep {text!r}: write NAME=V1,V2,... with NAME one of {', '.join(SWEEPABLE)}",
                         setting="sweep")
    try:
        return key, [int(v) for v in values.split(",")]
    except ValueError as e:
        raise InputError(f"sweep {text!r}: values must be whole numbers", setting="sweep") from e


@dataclass(frozen=True)
class ProfileSettings:
    model_dir: str | None = None  # an exported folder (or an engine folder) to run
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None  # CPU threads of the backend; None: all cores
    image: str | None = None  # an image to profile with (its preprocessing timed)...
    tiles: int | None = None  # ...or this many random tiles through the vision graph; neither: text only
    prompt_tokens: int = 128  # text tokens of the prompt, the template's included
    new_tokens: int = 64  # generated per run; stop tokens are ignored so that every run does the same work
    runs: int = 5  # measured runs
    warmup: int = 1  # runs before them, not measured
    sweep: str | None = None  # "prompt-tokens=128,512" etc.: one profile per value
    json_path: str | None = None  # every raw timing is written here
    plot_path: str | None = None  # a PNG is written here
    roofline_only: bool = False  # the decode bound from the model's numbers alone; nothing runs
    device_model: str | None = None  # a key of roofline.DEVICES, or None / "all" for every device
    preset: str | None = None  # a config preset whose roofline to draw when there is no model_dir
    contexts: tuple[int, ...] = (128, 512, 2048)  # contexts of the roofline-only table

    def __post_init__(self):
        for name, low in (("prompt_tokens", 1), ("new_tokens", 1), ("runs", 1), ("warmup", 0)):
            if getattr(self, name) < low:
                raise InputError(f"{name.replace('_', ' ')} {getattr(self, name)}: must be at least {low}", setting=name)
        if self.tiles is not None and self.tiles < 1:
            raise InputError(f"tiles {self.tiles}: must be at least 1 (or none, for a prompt without an image)",
                             setting="tiles")
        if not self.contexts or min(self.contexts) < 1:
            raise InputError(f"contexts {list(self.contexts)}: every context must be at least 1 token", setting="contexts")
        if not self.model_dir and not (self.roofline_only and self.preset):
            raise InputError("nothing to profile: name an exported model folder, or a config preset when only "
                             "the roofline is asked for", setting="model_dir")
        if self.sweep:
            self.swept()  # a malformed sweep fails now, not after the model has loaded

    def swept(self) -> list[ProfileSettings]:
        """One settings per value of the sweep, the swept field set to it; without a sweep, [self]."""
        if not self.sweep:
            return [self]
        key, values = parse_sweep(self.sweep)
        try:
            return [replace(self, sweep=None, **{SWEEPABLE[key]: value}) for value in values]
        except InputError as e:  # a value out of range: the sweep is at fault, not the field it varies
            raise InputError(f"sweep {self.sweep!r}: {e}", setting="sweep") from e
