"""One prompt through a model folder's graphs as a single prefill from an empty cache, on plain ONNX
Runtime CPU sessions: vision -> embedding -> decoder, returning the last position's logits and, when
asked, any inner tensors (added to the graphs as extra outputs). Calibration and the agreement check
use it; it reads nothing of the KV contract but the manifest's input specs (the caches are zeros)."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
from onnx import helper

from hovle_edge.errors import InputError
from hovle_edge.runtime.ort_threads import session_options


def prefill_feeds(manifest, graph: str, sequence: int, named: dict) -> dict:
    """Zeros for every input of `graph` not given in `named`, sized for a prefill of `sequence` tokens
    from an empty cache (a cache of `sequence` slots, all written by this call)."""
    sizes = {"batch": 1, "sequence": sequence, "total_sequence": sequence, "kv_capacity": sequence,
             "past_sequence": 0}
    feeds = {}
    inputs, _ = manifest.graph_io(graph)
    for spec in inputs:
        if spec.name in named:
            feeds[spec.name] = named[spec.name]
        else:
            feeds[spec.name] = np.zeros([sizes[d] if isinstance(d, str) else d for d in spec.dims], dtype=spec.dtype)
    return feeds


def with_outputs(path: str, names: list[str], directory: str) -> str:
    """A copy of the graph at `path` that also outputs `names`, written into `directory`."""
    model = onnx.load(path)
    types = {t.name: t.data_type for t in model.graph.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)})
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    out = os.path.join(directory, os.path.basename(path))
    onnx.save_model(model, out, save_as_external_data=True, location=os.path.basename(out) + ".data")
    return out


class PrefillRunner:
    """Sessions over one folder; `recorded` names the inner tensors to return, by graph."""

    def __init__(self, manifest, recorded: dict[str, list[str]] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.manifest = manifest
        self.recorded = recorded or {}
        options = session_options(ort, threads)
        self.sessions = {}
        with tempfile.TemporaryDirectory(prefix="hovle-prefill-") as work:
            for graph in ("vision", "embedding", "decoder"):
                path = manifest.graph_path(graph)
                if self.recorded.get(graph):
                    path = with_outputs(path, self.recorded[graph], work)
                self.sessions[graph] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def image_embeds(self, pixels: np.ndarray | None) -> np.ndarray:
        hidden = self.manifest.model["hidden"]
        if pixels is None:  # the graph takes one dummy row when no position is an image token
            return np.zeros((1, hidden), dtype=self.manifest.kv_dtype)
        return self.sessions["vision"].run(["image_embeds"], {"pixel_values": pixels})[0].reshape(-1, hidden)

    def run(self, ids: list[int], image_embeds: np.ndarray) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
        """(logits [V] at the last position, {graph: {name: value}} of the recorded tensors)."""
        sequence = len(ids)
        named = {"position_ids": np.arange(sequence, dtype=np.int64)[None],
                 "attention_mask": np.ones((1, sequence), dtype=np.int64)}
        embedding = {**named, "input_ids": np.asarray([ids], dtype=np.int64), "image_embeds": image_embeds}
        names = ["inputs_embeds"] + self.recorded.get("embedding", [])
        values = self.sessions["embedding"].run(names, prefill_feeds(self.manifest, "embedding", sequence, embedding))
        recorded = {"embedding": dict(zip(names[1:], values[1:]))}
        decoder = {**named, "inputs_embeds": values[0]}
        names = ["logits"] + self.recorded.get("decoder", [])
        values = self.sessions["decoder"].run(names, prefill_feeds(self.manifest, "decoder", sequence, decoder))
        recorded["decoder"] = dict(zip(names[1:], values[1:]))
        return values[0].reshape(-1), recorded


def check_image_rows(ids: list[int], image_embeds: np.ndarray, image_context: int, has_image: bool, what: str) -> None:
    if sum(i == image_context for i in ids) != (len(image_embeds) if has_image else 0):
        raise InputError(f"{what}: its image-context tokens and the image's rows differ; a prompt must not "
                         "hold image-context tokens of its own")
