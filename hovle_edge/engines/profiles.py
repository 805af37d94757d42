"""TensorRT optimization profiles as plain data, derived from a model folder's manifest: for the
embedding and decoder graphs a decode profile (one token at any total length), a prefill profile
(a prompt of 2..max prompt tokens into an empty cache) and an extend profile (2..max prompt tokens
after a past: a conversation's next turn, which runs only its own tokens); for the vision graph
tiles 1..max tiles. Nothing here imports TensorRT, so it is tested everywhere; the real builder
(tests/test_engines_rtx.py) proves the points consistent."""

from __future__ import annotations

from dataclasses import dataclass

from hovle_edge.errors import InputError
from hovle_edge.spec import BATCH, CAPACITY, IMAGE_ROWS, SEQUENCE, TILES, TOTAL, Manifest


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
        raise InputError(f"a context of {context} tokens is more than the model was exported for "
                         f"({manifest.max_context})", setting="max_context")
    tiles_exported = model["max_tiles"] + (1 if model["use_thumbnail"] and model["max_tiles"] > 1 else 0)
    tiles = max_tiles or tiles_exported
    if tiles > tiles_exported:
        raise InputError(f"{tiles} tiles are more than the model takes ({tiles_exported} with the thumbnail)",
                         setting="max_tiles")
    prompt = max_prompt or context
    if not 2 <= prompt <= context:
        raise InputError(f"the longest prompt ({prompt}) must lie between 2 and the context ({context})",
                         setting="max_prompt")
    return Limits(context, prompt, tiles, max_batch)


def mid(low: int, high: int) -> int:
    return max(low, min(high, (low + high) // 2))


def graph_profiles(graph: str, manifest: Manifest, limits: Limits) -> list[Profile]:
    """The profiles the engine of `graph` is built with, in the order the runtime selects them.

    With fixed-capacity caches the only relation between dims is T >= S (a call's tokens are among
    the slots in use), so every min, opt and max point below keeps it, and the three profiles
    together take every (T, S) with 1 <= S <= max prompt and S <= T <= max context: decode is S = 1
    at any T, prefill is T = S (nothing cached yet), and extend is a next turn of S >= 2 tokens
    after a past."""
    b = (1, 1, limits.max_batch)
    if graph == "vision":
        return [Profile("tiles", {TILES: (1, mid(1, limits.max_tiles), limits.max_tiles)})]
    image_rows = limits.max_tiles * manifest.model["tokens_per_tile"]
    prompt, context = limits.max_prompt, limits.max_context
    capacity = (1, context, context)
    decode = {BATCH: b, SEQUENCE: (1, 1, 1), TOTAL: (1, mid(1, context), context), CAPACITY: capacity,
              IMAGE_ROWS: (1, 1, 1)}
    prefill = {BATCH: b, SEQUENCE: (2, mid(2, prompt), prompt), TOTAL: (2, mid(2, prompt), prompt),
               CAPACITY: capacity, IMAGE_ROWS: (1, image_rows, image_rows)}
    extend = {BATCH: b, SEQUENCE: (2, mid(2, prompt), prompt), TOTAL: (3, mid(mid(2, prompt) + 1, context), context),
              CAPACITY: capacity, IMAGE_ROWS: (1, image_rows, image_rows)}
    used = {d for spec in manifest.graph_io(graph)[0] for d in spec.dims if isinstance(d, str)}
    return [Profile(name, {k: v for k, v in dims.items() if k in used})
            for name, dims in (("decode", decode), ("prefill", prefill), ("extend", extend))]


def choose_profile(profiles: list[Profile], dims: dict) -> int:
    """Index of the first profile whose ranges hold the given dim sizes; the runtime calls this."""
    for index, profile in enumerate(profiles):
        if all(profile.dims[k][0] <= v <= profile.dims[k][2] for k, v in dims.items() if k in profile.dims):
            return index
    raise InputError(f"no optimization profile takes {dims}; the engines were built for "
                     f"{[p.to_json() for p in profiles]}: rebuild with larger limits")
