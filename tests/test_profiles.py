"""TensorRT optimization profiles against the KV contract: every min, opt and max point keeps the
graphs' shape relations, every (T, S) the runtime can issue is taken by a profile, and the shapes a
real conversation issues (image prefill, decode steps, next turns, edges of the context) are walked
through choose_profile. tests/test_engines_rtx.py builds the same profiles in the real builder."""

import pytest

from hovle_edge.engines.profiles import choose_profile, graph_profiles, limits_for
from hovle_edge.errors import InputError
from hovle_edge.spec import CAPACITY, IMAGE_ROWS, SEQUENCE, TOTAL, load_manifest


@pytest.fixture(scope="module")
def manifest(tiny_export):
    return load_manifest(str(tiny_export))


def test_profiles_come_from_the_manifest(manifest):
    limits = limits_for(manifest, max_context=256, max_prompt=100)
    assert (limits.max_tiles, limits.max_context) == (7, 256)  # 6 tiles and the thumbnail
    vision = graph_profiles("vision", manifest, limits)
    assert [p.name for p in vision] == ["tiles"] and vision[0].dims == {"tiles": (1, 4, 7)}
    decode, prefill, extend = graph_profiles("decoder", manifest, limits)
    assert decode.dims[SEQUENCE] == (1, 1, 1) and decode.dims[TOTAL] == (1, 128, 256)
    assert prefill.dims[SEQUENCE] == prefill.dims[TOTAL] == (2, 51, 100)
    assert extend.dims[SEQUENCE] == (2, 51, 100) and extend.dims[TOTAL] == (3, 154, 256)
    assert all(p.dims[CAPACITY] == (1, 256, 256) for p in (decode, prefill, extend))
    assert IMAGE_ROWS not in decode.dims  # the decoder takes no image rows
    inputs, _ = manifest.graph_io("embedding")
    embedding_prefill = graph_profiles("embedding", manifest, limits)[1]
    assert embedding_prefill.dims[IMAGE_ROWS] == (1, 28, 28)  # 7 tiles x 4 tokens
    shapes = embedding_prefill.shapes(inputs)
    assert shapes["past_key_values.1.value"] == ((1, 2, 1, 16), (1, 2, 256, 16), (1, 2, 256, 16))
    assert shapes["input_ids"] == ((1, 2), (1, 51), (1, 100))
    assert shapes["attention_mask"] == ((1, 2), (1, 51), (1, 100))
    assert shapes["image_embeds"] == ((1, 64), (28, 64), (28, 64))


@pytest.mark.parametrize("context,prompt", [(256, 100), (64, 64), (9, 2), (4096, 2048)])
def test_every_point_keeps_the_shape_relations(manifest, context, prompt):
    """What the builder checks at each point: a call's tokens are among the slots in use (S <= T)
    and the slots cached before the call fit the buffer the graph reads them from (T - S <= C)."""
    limits = limits_for(manifest, max_context=min(context, manifest.max_context), max_prompt=min(prompt, context))
    for graph in ("embedding", "decoder"):
        for profile in graph_profiles(graph, manifest, limits):
            for k in range(3):
                point = {name: ranges[k] for name, ranges in profile.dims.items()}
                assert point[SEQUENCE] <= point[TOTAL], (graph, profile.name, k, point)
                assert point[TOTAL] - point[SEQUENCE] <= point[CAPACITY], (graph, profile.name, k, point)
                assert all(low <= mid <= high for low, mid, high in profile.dims.values())


def test_every_runtime_shape_has_a_profile(manifest):
    """Every (S, T) with 1 <= S <= max prompt and S <= T <= context, edges included; nothing past it."""
    limits = limits_for(manifest, max_context=96, max_prompt=40)
    profiles = graph_profiles("decoder", manifest, limits)
    for sequence in range(1, 41):
        for total in range(sequence, 97):
            index = choose_profile(profiles, {"batch": 1, SEQUENCE: sequence, TOTAL: total, CAPACITY: 96})
            low, _, high = profiles[index].dims[TOTAL]
            assert low <= total <= high
    for too_much in ({SEQUENCE: 41, TOTAL: 41}, {SEQUENCE: 1, TOTAL: 97}, {SEQUENCE: 2, TOTAL: 97}):
        with pytest.raises(InputError, match="no optimization profile takes"):
            choose_profile(profiles, {"batch": 1, CAPACITY: 96, **too_much})


class RecordingBackend:
    """The ONNX Runtime backend, recording the named dims of every embedding and decoder call."""

    def __init__(self, backend, manifest):
        self.backend, self.calls = backend, []
        self.specs = {g: manifest.graph_io(g)[0] for g in ("embedding", "decoder")}

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, graph, feeds, kv=None, device_outputs=()):
        if graph in self.specs:
            values, dims = {**feeds, **(kv or {})}, {}
            for spec in self.specs[graph]:
                dims.update({d: n for d, n in zip(spec.dims, values[spec.name].shape) if isinstance(d, str)})
            self.calls.append((graph, dims))
        return self.backend.run(graph, feeds, kv, device_outputs)


def test_a_real_conversation_walks_through_the_profiles(tiny_export):
    """The shapes the runtime itself issues: an image prefill, decode steps, next turns with and
    without an image, until the context is full."""
    from PIL import Image

    from hovle_edge.runtime import Pipeline

    with Pipeline.from_dir(str(tiny_export)) as pipe:
        recorder = pipe.backend = RecordingBackend(pipe.backend, pipe.manifest)
        chat = pipe.conversation(max_context=600)
        image = Image.new("RGB", (150, 70), "blue")
        turns = [("what colour?", image), ("and the shape?", None), ("again?", image), ("more", None)] * 8
        for question, picture in turns:
            try:
                list(chat.ask(question, image=picture, max_new_tokens=40, temperature=1.0, seed=1))
            except InputError:  # the context is full
                break
        assert chat.cache.length > 550
    limits = limits_for(pipe.manifest, max_context=600, max_prompt=300)
    kinds = set()
    for graph, dims in recorder.calls:
        profiles = graph_profiles(graph, pipe.manifest, limits)
        kinds.add(profiles[choose_profile(profiles, dims)].name)
    assert kinds == {"decode", "prefill", "extend"}
