"""The three graphs of the contract as small torch modules over the reference model, each declared
as data (a GraphSpec: module, tensor specs, example sizes) so that one export function serves all.
These are the portable graphs (standard ops; the `tensorrt` target): their caches are fixed-capacity
buffers of which the graph reads the slots in use, and their presents are only the new rows, which
the runtime writes into its buffers (spec.NEW_ROWS)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from hovle_edge import spec
from hovle_edge.model import HoVLE

DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
# Example sizes for tracing: all >= 2 and distinct, so that no dim is specialized or confused.
EXAMPLE_DIMS = {spec.BATCH: 2, spec.SEQUENCE: 5, spec.TOTAL: 8, spec.CAPACITY: 11, spec.TILES: 2, spec.IMAGE_ROWS: 6}


class VisionGraph(nn.Module):
    def __init__(self, model: HoVLE):
        super().__init__()
        self.embedding = model.embedding_model

    def forward(self, pixel_values):
        return self.embedding.image_embeds(pixel_values)


def _cached_pairs(flat, attention_mask, new_tokens: int):
    """The slots in use before this call, (key, value) per layer: the first T - S of each buffer."""
    used = attention_mask.shape[1] - new_tokens
    return [(flat[i][:, :, :used], flat[i + 1][:, :, :used]) for i in range(0, len(flat), 2)]


def _new_rows(presents, new_tokens: int):
    """This call's rows of every layer's key and value, flattened as the contract lists them."""
    return [t[:, :, t.shape[2] - new_tokens:] for kv in presents for t in kv]


class EmbeddingGraph(nn.Module):
    def __init__(self, model: HoVLE):
        super().__init__()
        self.embedding = model.embedding_model

    def forward(self, input_ids, image_embeds, position_ids, attention_mask, *past):
        new = input_ids.shape[1]
        past = _cached_pairs(past, attention_mask, new)
        embeds, presents = self.embedding(input_ids, image_embeds, position_ids, attention_mask, past)
        return (embeds, *_new_rows(presents, new))


class DecoderGraph(nn.Module):
    """The LLM, logits for the last position only, in fp32."""

    def __init__(self, model: HoVLE):
        super().__init__()
        self.llm = model.language_model

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        new = inputs_embeds.shape[1]
        past = _cached_pairs(past, attention_mask, new)
        hidden, presents = self.llm.hidden_states(inputs_embeds, position_ids, attention_mask, past)
        logits = self.llm.output(hidden[:, -1:]).float()
        return (logits, *_new_rows(presents, new))


@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    inputs: list
    outputs: list

    def example_inputs(self) -> tuple:
        """Random tensors of the example sizes; ids and masks valid for the model."""
        values = []
        for t in self.inputs:
            shape = [EXAMPLE_DIMS[d] if isinstance(d, str) else d for d in t.dims]
            if t.name == "attention_mask":
                values.append(torch.ones(shape, dtype=torch.int64))
            elif t.name in ("input_ids", "position_ids"):
                values.append(torch.randint(0, 8, shape, dtype=torch.int64))
            else:
                values.append(torch.randn(shape, dtype=DTYPES[t.dtype]))
        return tuple(values)

    def dynamic_shapes(self) -> tuple:
        """Every named dim dynamic. torch.export finds the relations itself (total = past + sequence,
        which its Dim arithmetic cannot state) and raises if tracing specialized one."""
        shapes = [{axis: torch.export.Dim.DYNAMIC for axis, d in enumerate(t.dims) if isinstance(d, str)}
                  for t in self.inputs]
        named = [s for s, t in zip(shapes, self.inputs) if not t.name.startswith("past_key_values.")]
        past = shapes[len(named):]
        return (*named, tuple(past)) if past else tuple(named)  # the past arrives as *past


def graph_specs(model: HoVLE, dtype: str) -> list[GraphSpec]:
    cfg = model.config
    emb, llm = cfg.embedding_config, cfg.llm_config
    return [
        GraphSpec("vision", VisionGraph(model), *spec.vision_io(emb.image_size, emb.tokens_per_tile, emb.hidden_size, dtype)),
        GraphSpec("embedding", EmbeddingGraph(model),
                  *spec.embedding_io(emb.num_hidden_layers, emb.num_key_value_heads, emb.head_dim, emb.hidden_size, dtype)),
        GraphSpec("decoder", DecoderGraph(model),
                  *spec.decoder_io(llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim, llm.hidden_size,
                                   llm.vocab_size, dtype)),
    ]
