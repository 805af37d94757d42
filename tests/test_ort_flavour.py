"""The `onnxruntime` graph target (export/ort_graphs.py): its embedding and decoder graphs against the
PyTorch reference, run the way the runtime runs them (each past bound to the same buffer as its
present), then the whole model through the runtime: greedy tokens equal PyTorch's."""

import numpy as np
import pytest
import torch

from hovle_edge import spec
from hovle_edge.export.ort_graphs import decoder_graph, embedding_graph
from hovle_edge.runtime.ort_threads import session_options

ort = pytest.importorskip("onnxruntime")

CAPACITY = 12
TOLERANCE = {"float32": 1e-4, "float16": 5e-2}  # as export/parity.py, for outputs of magnitude up to 1


def session(model):
    return ort.InferenceSession(model.SerializeToString(), session_options(ort), providers=["CPUExecutionProvider"])


def run_in_place(graph, feeds: dict, buffers: dict, output: str) -> np.ndarray:
    """One call with every past and its present bound to one OrtValue, as the runtime binds them."""
    binding = graph.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    binding.bind_output(output)
    for name, buffer in buffers.items():
        binding.bind_ortvalue_input(name, buffer)
        binding.bind_ortvalue_output(name.replace("past_key_values", "present"), buffer)
    graph.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()


def noise_buffers(cfg, batch: int, dtype: str) -> dict:
    """Cache buffers that start as noise: slots not yet written must not matter."""
    rng = np.random.default_rng(0)
    shape = (batch, cfg.num_key_value_heads, CAPACITY, cfg.hidden_size // cfg.num_attention_heads)
    return {name: ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape).astype(dtype))
            for name in spec.past_names(cfg.num_hidden_layers)}


def assert_close(got, expected, dtype: str, real=None):
    """Max abs error within the parity tolerance, at real (not padding) positions when `real` [B, S] is given."""
    expected = expected.detach().float().numpy()
    error = np.abs(got.astype(np.float32) - expected)
    if real is not None:
        error = error[real]
    assert error.max() <= TOLERANCE[dtype] * max(1.0, float(np.abs(expected).max()))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_graphs_match_pytorch_with_left_padding_then_decode(tiny_model, dtype):
    """Batch 2, row 1 left-padded by 2, image rows in both rows; then one decode step on the same buffers."""
    cfg = tiny_model.config
    emb_cfg, llm_cfg = cfg.embedding_config, cfg.llm_config
    embedding = session(embedding_graph(tiny_model, dtype, max_context=64))
    decoder = session(decoder_graph(tiny_model, dtype, max_context=64))
    generator = torch.Generator().manual_seed(0)
    B, S = 2, 6
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ids = torch.randint(20, llm_cfg.vocab_size, (B, S), generator=generator)
    ids[0, 1:3] = ids[1, 3:5] = emb_cfg.img_context_token_id
    rows = torch.randn(4, emb_cfg.hidden_size, generator=generator)
    real = mask.bool().numpy()
    emb_buffers, llm_buffers = noise_buffers(emb_cfg, B, dtype), noise_buffers(llm_cfg, B, dtype)
    untouched = emb_buffers["past_key_values.0.key"].numpy()[:, :, S + 1:].copy()

    with torch.no_grad():
        embeds, emb_presents = tiny_model.embedding_model(ids, rows, positions, mask)
        logits, llm_presents = tiny_model.language_model(embeds, positions, mask)
        # GQA rotates each key at its slot, so row 1's keys are turned 2 positions further than PyTorch's;
        # rotary scores depend only on position differences, so every output above is PyTorch's.
        slots = torch.arange(S).expand(B, S)
        _, emb_slot_presents = tiny_model.embedding_model(ids, rows, slots, mask)
    got = run_in_place(embedding, {"input_ids": ids.numpy(), "image_embeds": rows.numpy().astype(dtype),
                                   "position_ids": positions.numpy(), "attention_mask": mask.numpy()},
                       emb_buffers, "inputs_embeds")
    assert_close(got, embeds, dtype, real)
    for i, (key, value) in enumerate(emb_slot_presents):  # the graph wrote slots 0..S-1 of the buffers itself
        assert_close(emb_buffers[f"past_key_values.{i}.key"].numpy()[:, :, :S].transpose(0, 2, 1, 3), key.transpose(1, 2), dtype, real)
        assert_close(emb_buffers[f"past_key_values.{i}.value"].numpy()[:, :, :S].transpose(0, 2, 1, 3), value.transpose(1, 2), dtype, real)
    got = run_in_place(decoder, {"inputs_embeds": embeds.numpy().astype(dtype), "position_ids": positions.numpy(),
                                 "attention_mask": mask.numpy()}, llm_buffers, "logits")
    assert got.dtype == np.float32 and got.shape == (B, 1, llm_cfg.vocab_size)
    assert_close(got, logits[:, -1:], dtype)

    mask = torch.cat((mask, torch.ones(B, 1, dtype=torch.long)), 1)
    positions = mask.sum(-1, keepdim=True) - 1
    step_ids = torch.randint(20, llm_cfg.vocab_size, (B, 1), generator=generator)
    with torch.no_grad():
        embeds, _ = tiny_model.embedding_model(step_ids, None, positions, mask, emb_presents)
        logits, _ = tiny_model.language_model(embeds, positions, mask, llm_presents)
    got = run_in_place(embedding, {"input_ids": step_ids.numpy(), "position_ids": positions.numpy(),
                                   "image_embeds": np.zeros((1, emb_cfg.hidden_size), dtype),
                                   "attention_mask": mask.numpy()}, emb_buffers, "inputs_embeds")
    assert_close(got, embeds, dtype)
    got = run_in_place(decoder, {"inputs_embeds": embeds.numpy().astype(dtype), "position_ids": positions.numpy(),
                                 "attention_mask": mask.numpy()}, llm_buffers, "logits")
    assert_close(got, logits, dtype)
    # Written in place: the slots after the ones in use are the noise they started as.
    assert np.array_equal(emb_buffers["past_key_values.0.key"].numpy()[:, :, S + 1:], untouched)


# The whole model, exported for the onnxruntime target and run by the runtime.

@pytest.fixture(scope="module")
def ort_export(tiny_checkpoint, tmp_path_factory):
    from hovle_edge.export import export_model

    out = tmp_path_factory.mktemp("exported") / "tiny-onnxruntime"
    export_model(str(tiny_checkpoint), str(out), progress=False, target="onnxruntime")
    return out


@pytest.fixture(scope="module")
def pipe(ort_export):
    from hovle_edge.runtime import Pipeline

    with Pipeline.from_dir(str(ort_export)) as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from hovle_edge.model import HoVLE

    return HoVLE.from_pretrained(str(tiny_checkpoint))


def image_pixels(pipe):
    from PIL import Image

    rng = np.random.default_rng(0)
    return pipe.pixel_values(Image.fromarray((rng.random((70, 150, 3)) * 255).astype(np.uint8)), None)


def test_manifest_records_the_target_and_graphs_hold_fused_ops(ort_export):
    import onnx

    manifest = spec.load_manifest(str(ort_export))
    assert manifest.data["target"] == "onnxruntime"
    assert manifest.data["kv"] == {"layout": "capacity", "present": spec.IN_PLACE}
    _, outputs = manifest.graph_io("decoder")
    assert [o.dims[2] for o in outputs if o.name.startswith("present.")] == [spec.CAPACITY] * 4
    ops = {n.op_type for n in onnx.load(str(ort_export / "decoder.onnx"), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert not ops & {"Softmax", "RotaryEmbedding", "Split"}  # GQA rotates the packed QKV rows itself


def test_greedy_with_image_equals_pytorch(pipe, reference):
    from hovle_edge.model import generate

    pixels = image_pixels(pipe)
    ids = pipe.tokenizer.encode(pipe.template.prompt("what colour is the square?", tiles=len(pixels)), bos=True)
    tokens = pipe.conversation().ask_ids(ids, pixels, max_new_tokens=24)
    expected = generate(reference, torch.tensor([ids]), torch.from_numpy(pixels), max_new_tokens=24,
                        stop_ids=set(pipe.manifest.stop_ids))
    assert tokens == expected


def test_two_turn_conversation_equals_pytorch(pipe, reference):
    """The second turn runs on the caches the first one wrote in place; PyTorch runs it all from scratch."""
    from hovle_edge.model import generate

    pixels = image_pixels(pipe)
    chat = pipe.conversation()
    first_ids = pipe.tokenizer.encode(pipe.template.prompt("what colour is the square?", tiles=len(pixels)), bos=True)
    first = chat.ask_ids(first_ids, pixels, max_new_tokens=10)
    second_ids = chat.pending + pipe.tokenizer.encode(pipe.template.user_turn("and the circle?"))
    history = list(chat.ids)
    second = chat.ask_ids(second_ids, max_new_tokens=10)
    stops = set(pipe.manifest.stop_ids)
    assert first == generate(reference, torch.tensor([first_ids]), torch.from_numpy(pixels), max_new_tokens=10,
                             stop_ids=stops)
    assert second == generate(reference, torch.tensor([history + second_ids]), torch.from_numpy(pixels),
                              max_new_tokens=10, stop_ids=stops)


def test_build_refuses_an_onnxruntime_target_folder(ort_export, tmp_path):
    from hovle_edge.engines.builder import build_engines
    from hovle_edge.errors import EngineBuildError

    with pytest.raises(EngineBuildError, match="export it again with --target tensorrt"):
        build_engines(str(ort_export), str(tmp_path / "engines"))
