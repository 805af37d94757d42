"""TensorRT optimization profiles as plain data, derived from a model folder's manifest: for the
embedding and decoder graphs a prefill profile (past 0, sequence 1..max prompt), a decode profile
(sequence 1, past 1..max context - 1) and an extend profile (sequence 2..max prompt after a past: a
conversation's next turn, which runs only its own tokens); for the vision graph tiles 1..max tiles.
The three never overlap, so exactly one takes any step. Nothing here imports TensorRT, so it is
tested everywhere."""

from __future__ import annotations

from dataclasses import dataclass

from hovle_edge.errors import InputError
from hovle_edge.spec import BATCH, IMAGE_ROWS, PAST, SEQUENCE, TILES, TOTAL, Manifest


@dataclass(frozen=True)
class Limits:
    max_context: int
    max_prompt: int
    max_tiles: int
    max_batch: int = 1


@dataclass
class Profile:
    """One optimization profile: per named dim (min, opt, max); shapes follow from the tensor specs."""

    name: str
    dims: dict

    def shapes(self, inputs) -> dict:
        """input name -> (min shape, opt shape, max shape)."""
        out = {}
        for spec in inputs:
            picked = [[d if isinstance(d, int) else self.dims[d][k] for d in spec.dims] for k in range(3)]
            out[spec.name] = tuple(tuple(s) for s in picked)
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "dims": {k: list(v) for k, v in self.dims.items()}}


def limits_for(manifest: Manifest, max_context: int | None = None, max_prompt: int | None = None,
               max_tiles: int | None = None, max_batch: int = 1) -> Limits:
    model = manifest.model
    context = max_context or manifest.max_context
    if context > manifest.max_context:
        raise InputError(f"--max-context {context} is more than the model was exported for ({manifest.max_context})")
    tiles_exported = model["max_tiles"] + (1 if model["use_thumbnail"] and model["max_tiles"] > 1 else 0)
    tiles = max_tiles or tiles_exported
    if tiles > tiles_exported:
        raise InputError(f"--max-tiles {tiles} is more than the model takes ({tiles_exported} with the thumbnail)")
    prompt = max_prompt or context
    if not 2 <= prompt <= context:
        raise InputError(f"the longest prompt ({prompt}) must lie between 2 and the context ({context})")
    return Limits(context, prompt, tiles, max_batch)


def mid(low: int, high: int) -> int:
    return max(low, min(high, (low + high) // 2))


def graph_profiles(graph: str, manifest: Manifest, limits: Limits) -> list[Profile]:
    """The profiles the engine of `graph` is built with, in the order the runtime selects them."""
    b = (1, 1, limits.max_batch)
    if graph == "vision":
        return [Profile("tiles", {TILES: (1, mid(1, limits.max_tiles), limits.max_tiles)})]
    image_rows = limits.max_tiles * manifest.model["tokens_per_tile"]
    prompt = limits.max_prompt
    prefill = {BATCH: b, SEQUENCE: (1, mid(1, prompt), prompt), PAST: (0, 0, 0), TOTAL: (1, mid(1, prompt), prompt),
               IMAGE_ROWS: (1, image_rows, image_rows)}
    last = limits.max_context - 1
    decode = {BATCH: b, SEQUENCE: (1, 1, 1), PAST: (1, mid(1, last), last), TOTAL: (2, mid(1, last) + 1, last + 1),
              IMAGE_ROWS: (1, 1, 1)}
    turn = min(prompt, last)
    extend = {BATCH: b, SEQUENCE: (2, mid(2, turn), max(2, turn)), PAST: (1, mid(1, last - 2), max(1, last - 1)),
              TOTAL: (3, mid(3, limits.max_context), limits.max_context), IMAGE_ROWS: (1, image_rows, image_rows)}
    used = {d for spec in manifest.graph_io(graph)[0] for d in spec.dims if isinstance(d, str)}
    return [Profile(name, {k: v for k, v in dims.items() if k in used})
            for name, dims in (("prefill", prefill), ("decode", decode), ("extend", extend))]


def choose_profile(profiles: list[Profile], dims: dict) -> int:
    """Index of the first profile whose ranges hold the given dim sizes; the runtime calls this."""
    for index, profile in enumerate(profiles):
        if all(profile.dims[k][0] <= v <= profile.dims[k][2] for k, v in dims.items() if k in profile.dims):
            return index
    raise InputError(f"no optimization profile takes {dims}; the engines were built for "
                     f"{[p.to_json() for p in profiles]}: rebuild with larger limits")
