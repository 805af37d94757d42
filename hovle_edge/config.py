"""Typed configs for the holistic embedding, the InternLM2 LLM and HoVLE, read from and written to
the official `config.json` (keys as in the OpenGVLab/HoVLE checkpoint). Unknown keys are kept in
`extra` and written back unchanged, so a round trip loses nothing. Torch-free."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hovle_edge.errors import ConfigError
from hovle_edge.files import read_json


# Keys of the official config.json and of Hugging Face configs that change nothing here; any other
# unknown key is kept in `extra` but warned about, since it is most likely a misspelt setting.
UNUSED_KEYS = {"architectures", "auto_map", "model_type", "torch_dtype", "transformers_version", "use_cache",
               "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "attn_implementation",
               "special_token_maps", "system_message", "use_flash_attn", "pretraining_tp", "output_attentions",
               "output_hidden_states", "return_dict", "tie_word_embeddings", "hidden_act"}
# Values checked by the kind their field declares. Sizes must be at least 1; these may be less.
KINDS = {"int": "a whole number", "float": "a finite number", "bool": "true or false", "str": "a string",
         "int | None": "a whole number or null", "list": "a list"}
NOT_SIZES = {"select_layer": None, "use_backbone_lora": 0, "use_llm_lora": 0, "img_context_token_id": 0}


def _is_kind(value, kind: str) -> bool:
    whole = isinstance(value, int) and not isinstance(value, bool)
    return {"int": whole, "int | None": value is None or whole, "bool": isinstance(value, bool),
            "float": whole or isinstance(value, float) and math.isfinite(value), "str": isinstance(value, str),
            "list": isinstance(value, list)}.get(kind, True)


def config_from_dict(cls, data: dict, where: str):
    """Build dataclass `cls` from `data`: required keys present, every known value of its field's kind
    and sizes at least 1 (a "2" or a 0 would fail later, deep in the model), unknown keys kept in
    `extra` with a warning."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object of settings, got {type(data).__name__} {data!r:.60}")
    missing = [k for k in cls.REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    fields = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "extra"}
    for key, value in data.items():
        kind = fields.get(key)
        if kind in KINDS and not _is_kind(value, kind):
            raise ConfigError(f"{where}: {key} is {value!r}; it must be {KINDS[kind]}")
        low = NOT_SIZES.get(key, 1) if kind in ("int", "float", "int | None") else None
        if low is not None and value is not None and (value < low if kind != "float" else value <= 0):
            raise ConfigError(f"{where}: {key} is {value!r}; it must be {'> 0' if kind == 'float' else f'>= {low}'}")
    for key in data:
        if key not in fields and key not in UNUSED_KEYS and not key.startswith("_"):
            guess = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            warnings.warn(f"{where}: unknown key {key!r} is ignored{hint}", stacklevel=2)
    known = {k: v for k, v in data.items() if k in fields}
    extra = {k: v for k, v in data.items() if k not in fields}
    return cls(**known, extra=extra)


def config_to_dict(obj) -> dict:
    out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "extra"}
    out.update(obj.extra)
    return out


@dataclass
class EmbeddingConfig:
    """The holistic embedding: patch embedding + word embedding + N causal InternLM2 layers."""

    REQUIRED: ClassVar[tuple] = ("patch_size", "image_size", "hidden_size", "intermediate_size",
                                 "llm_vocab_size", "img_context_token_id")
    patch_size: int = 14
    image_size: int = 448
    hidden_size: int = 2048
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    num_hidden_layers: int = 8
    intermediate_size: int = 8192
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-5
    llm_vocab_size: int = 92553
    llm_hidden_size: int = 2048
    downsample_ratio: float = 0.5
    img_context_token_id: int = 92546
    pixel_shuffle_loc: str = "pre"
    use_pixel_shuffle_proj: bool = True
    use_ls: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        where = "embedding_config"
        if self.pixel_shuffle_loc != "pre":
            raise ConfigError(f"{where}: pixel_shuffle_loc {self.pixel_shuffle_loc!r} (the HD variant) "
                              "is not supported; only 'pre' is")
        if not self.use_pixel_shuffle_proj:
            raise ConfigError(f"{where}: use_pixel_shuffle_proj false is not supported")
        if self.use_ls:
            raise ConfigError(f"{where}: use_ls (layer scale) true is not supported")
        if self.hidden_size != self.llm_hidden_size:
            raise ConfigError(f"{where}: hidden_size {self.hidden_size} != llm_hidden_size "
                              f"{self.llm_hidden_size}; image tokens enter the layers at llm width")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{where}: image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}")
        if self.downsample_ratio != 0.5 or self.grid % 2:
            raise ConfigError(f"{where}: only a 0.5 pixel shuffle over an even patch grid is "
                              f"supported (ratio {self.downsample_ratio}, grid {self.grid})")
        _check_heads(where, self.hidden_size, self.num_attention_heads, self.num_key_value_heads)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size  # patches per side of a tile

    @property
    def tokens_per_tile(self) -> int:
        return (self.grid // 2) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class LLMConfig:
    """InternLM2 (`InternLM2ForCausalLM`), used unchanged."""

    REQUIRED: ClassVar[tuple] = ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                 "intermediate_size", "vocab_size")
    num_hidden_layers: int = 24
    hidden_size: int = 2048
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    intermediate_size: int = 8192
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    vocab_size: int = 92553
    bias: bool = False
    rope_scaling: Any = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    architectures: list = field(default_factory=lambda: ["InternLM2ForCausalLM"])
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        where = "llm_config"
        for key, ok in (("bias", not self.bias), ("rope_scaling", self.rope_scaling is None),
                        ("tie_word_embeddings", not self.tie_word_embeddings),
                        ("hidden_act", self.hidden_act == "silu")):
            if not ok:
                raise ConfigError(f"{where}: {key}={getattr(self, key)!r} is not supported")
        _check_heads(where, self.hidden_size, self.num_attention_heads, self.num_key_value_heads)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _check_heads(where: str, hidden: int, heads: int, kv_heads: int):
    if hidden % heads or heads % kv_heads:
        raise ConfigError(f"{where}: hidden {hidden}, heads {heads}, kv heads {kv_heads} do not divide")


@dataclass
class HoVLEConfig:
    """HoVLE (`InternVLChatConfig`): the embedding and LLM configs plus the image-input settings."""

    REQUIRED: ClassVar[tuple] = ("embedding_config", "llm_config")
    embedding_config: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    llm_config: LLMConfig = field(default_factory=LLMConfig)
    template: str = "internlm2-chat"
    downsample_ratio: float = 0.5
    select_layer: int = -1
    force_image_size: int | None = 448
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    ps_version: str = "v2"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    pad2square: bool = False
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    normalize_encoder_output: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.embedding_config, EmbeddingConfig):  # a dict, or a wrong kind that says so
            self.embedding_config = config_from_dict(EmbeddingConfig, self.embedding_config, "embedding_config")
        if not isinstance(self.llm_config, LLMConfig):
            self.llm_config = config_from_dict(LLMConfig, self.llm_config, "llm_config")
        if self.min_dynamic_patch > self.max_dynamic_patch:
            raise ConfigError(f"min_dynamic_patch {self.min_dynamic_patch} is more than max_dynamic_patch "
                              f"{self.max_dynamic_patch}")
        emb, llm = self.embedding_config, self.llm_config
        if emb.llm_hidden_size != llm.hidden_size or emb.llm_vocab_size != llm.vocab_size:
            raise ConfigError(f"embedding_config (hidden {emb.llm_hidden_size}, vocab {emb.llm_vocab_size}) "
                              f"does not match llm_config (hidden {llm.hidden_size}, vocab {llm.vocab_size})")
        if emb.img_context_token_id >= llm.vocab_size:
            raise ConfigError(f"img_context_token_id {emb.img_context_token_id} is outside the vocab "
                              f"({llm.vocab_size})")

    @property
    def image_size(self) -> int:
        return self.embedding_config.image_size

    @property
    def tokens_per_tile(self) -> int:
        return self.embedding_config.tokens_per_tile

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "HoVLEConfig":
        try:
            return config_from_dict(cls, data, where)
        except TypeError as e:  # a value of the wrong kind, e.g. a list where a dict belongs
            raise ConfigError(f"{where}: {e}") from e
        except ConfigError as e:  # raised inside embedding_config or llm_config: name the file too
            if str(e).startswith(where):
                raise
            raise ConfigError(f"{where}: {e}") from e

    def to_dict(self) -> dict:
        out = config_to_dict(self)
        out["embedding_config"] = config_to_dict(self.embedding_config)
        out["llm_config"] = config_to_dict(self.llm_config)
        return out

    @classmethod
    def from_pretrained(cls, directory: str) -> "HoVLEConfig":
        path = os.path.join(directory, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no config.json in {directory}")
        data = read_json(path, ConfigError)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return cls.from_dict(data, where=path)

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


def _tiny() -> HoVLEConfig:
    # Widths small enough for CPU tests in seconds; special ids match the shapes tokenizer's layout.
    layer = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                 rms_norm_eps=1e-5)
    return HoVLEConfig(
        embedding_config=EmbeddingConfig(patch_size=14, image_size=56, num_hidden_layers=2,
                                          llm_vocab_size=512, llm_hidden_size=64, img_context_token_id=7,
                                          rope_theta=10000.0, **layer),
        llm_config=LLMConfig(num_hidden_layers=2, vocab_size=512, max_position_embeddings=2048,
                             rope_theta=10000.0, **layer),
        force_image_size=56, max_dynamic_patch=6)


PRESETS = {
    "hovle-2.6b": HoVLEConfig,
    "tiny": _tiny,
}


def preset(name: str) -> HoVLEConfig:
    """A named config: `hovle-2.6b` (the official numbers) or `tiny` (for tests)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()
