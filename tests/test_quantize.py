"""Weight-only quantization: the block format on known matrices (numpy, MatMulNBits and INT4
DequantizeLinear in ONNX Runtime all agree), a quantized tiny export that the runtime reads and that
stays close to its float source, the TensorRT form built by the real TensorRT for RTX builder, and
the errors a user meets."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hovle_edge.errors import InputError, ModelFolderError
from hovle_edge.quantize import QuantizeSettings, quantize_model
from hovle_edge.quantize.awq import search_scale
from hovle_edge.quantize.blocks import QuantizedWeight, quantize_weight
from hovle_edge.quantize.calibration import encode, shapes_world_samples
from hovle_edge.quantize.graph import rewrite, weight_matmuls
from hovle_edge.quantize.prefill import PrefillRunner
from hovle_edge.runtime.ort_threads import session_options
from hovle_edge.spec import load_manifest

ort = pytest.importorskip("onnxruntime")


def known_weight(bits: int, rows: int = 64, cols: int = 24, group: int = 32) -> QuantizedWeight:
    """Codes and scales chosen by hand, each block holding its largest code, so quantizing the
    dequantized matrix must give them back exactly."""
    qmax = 2 ** (bits - 1) - 1
    codes = ((np.arange(rows * cols).reshape(rows, cols) * 7) % (2 * qmax + 1) - qmax).astype(np.int8)
    codes[::group] = qmax  # the first row of every block holds the largest code
    scales = (0.01 * (1 + np.arange(rows // group * cols)).reshape(rows // group, cols)).astype(np.float32)
    return QuantizedWeight(codes, scales, bits, group)


def single_matmul(weight: np.ndarray) -> onnx.ModelProto:
    rows, cols = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", cols])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = session_options(ort)
    # ONNX Runtime fuses DequantizeLinear -> MatMul into MatMulNBits computing in int8 (accuracy level 4,
    # about 1% off) unless told otherwise; here the float computation is the one checked.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_on_a_known_matrix(bits):
    known = known_weight(bits)
    weight = known.dequantize()
    again = quantize_weight(weight, bits, 32)
    np.testing.assert_array_equal(again.codes, known.codes)
    np.testing.assert_allclose(again.scales, known.scales, rtol=1e-6)
    # Any matrix: every element within half a step of its block's scale.
    noisy = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)
    quantized = quantize_weight(noisy, bits, 32)
    step = np.repeat(quantized.scales, 32, axis=0)
    assert np.all(np.abs(quantized.dequantize() - noisy) <= step / 2 + 1e-7)
    assert quantized.nbytes == 64 * 24 * bits // 8 + quantized.scales.nbytes


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
@pytest.mark.parametrize("bits", [4, 8])
def test_both_graph_forms_compute_x_times_the_dequantized_weight(bits, target):
    weight = known_weight(bits).dequantize()
    model = single_matmul(weight)
    chosen, _ = weight_matmuls(model, vocab=-1, quantize_head=False)
    report = rewrite(model, chosen, bits, 32, target)
    ops = [n.op_type for n in model.graph.node]
    assert ops == (["MatMulNBits"] if target == "onnxruntime" else ["DequantizeLinear", "MatMul"])
    assert [t.name for t in model.graph.initializer if t.name == "w"] == []  # the float weight is gone
    assert report.quantized_bytes < report.float_bytes * bits / 16
    onnx.checker.check_model(model)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), x @ weight, rtol=1e-5, atol=1e-5)


def test_activation_aware_scales_help_where_a_few_channels_are_large():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((128, 64)).astype(np.float32)
    activations = rng.standard_normal((512, 128)).astype(np.float32)
    activations[:, :4] *= 30  # a few outlier channels, as real LLM activations have
    choice = search_scale(weight, activations, bits=4, group_size=32)
    assert choice.alpha > 0 and choice.error < 0.7 * choice.rtn_error


@pytest.fixture(scope="module")
def int4_export(tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "tiny-int4"
    settings = QuantizeSettings(bits=4, group_size=32, method="awq", calibration_prompts=8, held_out_prompts=2,
                                answer_tokens=4)
    return quantize_model(str(tiny_export), str(out), settings, log=lambda line: None)


def test_int4_folder_is_complete_and_the_runtime_reads_it(tiny_export, int4_export):
    from hovle_edge.runtime import Pipeline

    manifest = load_manifest(int4_export.directory)  # every listed file present with its hash
    section = manifest.data["quantization"]
    assert (section["bits"], section["group_size"], section["method"], section["target"]) == (4, 32, "awq", "onnxruntime")
    assert section["quantized_head"] is False and section["agreement"]["positions"] > 0
    assert manifest.data["target"] == "onnxruntime"  # MatMulNBits in a portable export: `build` refuses it
    for graph in ("embedding", "decoder"):
        nodes = onnx.load(manifest.graph_path(graph), load_external_data=False).graph.node
        kinds = [n.op_type for n in nodes]
        assert kinds.count("MatMulNBits") == 5 * manifest.stack(graph if graph == "embedding" else "llm").layers
        # AWQ's 1/s; the word embedding stays a float Gather (the decoder starts from inputs_embeds)
        assert kinds.count("Mul") > 0 and ("Gather" in kinds or graph == "decoder")
    source = load_manifest(str(tiny_export))
    assert manifest.data["graphs"]["decoder"]["bytes"] < source.data["graphs"]["decoder"]["bytes"]
    with Pipeline.from_dir(int4_export.directory) as pipe:
        assert isinstance(pipe.generate("what colour is the circle?", max_new_tokens=3), str)


def test_int4_logits_stay_close_to_the_float_export(tiny_export, int4_export):
    """Tolerance: the tiny model's weights are N(0, 0.3) noise, the worst case for 4 bits; its last
    logits keep a correlation above 0.9 with the float export's (0.96-0.98 measured)."""
    source = load_manifest(str(tiny_export))
    reference, quantized = PrefillRunner(source), PrefillRunner(int4_export)
    from hovle_edge.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(str(tiny_export))
    for sample in shapes_world_samples(3, seed=5):
        ids, pixels = encode(sample, source, tokenizer)
        expected, _ = reference.run(ids, reference.image_embeds(pixels))
        got, _ = quantized.run(ids, quantized.image_embeds(pixels))
        assert np.corrcoef(expected, got)[0, 1] > 0.9
        assert not np.allclose(expected, got)  # it did change the weights


def test_int8_logits_are_near_the_float_export(tiny_export, tmp_path):
    """Tolerance: 8 bits move the tiny model's last logits by under 5% of their largest value."""
    settings = QuantizeSettings(bits=8, group_size=32, held_out_prompts=0)
    manifest = quantize_model(str(tiny_export), str(tmp_path / "int8"), settings, log=lambda line: None)
    source = load_manifest(str(tiny_export))
    from hovle_edge.tokenizer import Tokenizer

    ids, pixels = encode(shapes_world_samples(1, seed=7)[0], source, Tokenizer.from_dir(str(tiny_export)))
    reference, quantized = PrefillRunner(source), PrefillRunner(manifest)
    expected, _ = reference.run(ids, reference.image_embeds(pixels))
    got, _ = quantized.run(ids, quantized.image_embeds(pixels))
    assert np.abs(expected - got).max() < 0.05 * np.abs(expected).max()


@pytest.mark.slow
def test_onnxruntime_flavour_graphs_quantize_too(tiny_checkpoint, tmp_path):
    """The onnx.helper graphs (GroupQueryAttention on shared buffers) have the same weight MatMuls."""
    from hovle_edge.export import export_model
    from hovle_edge.runtime import Pipeline

    source = export_model(str(tiny_checkpoint), str(tmp_path / "ort"), target="onnxruntime", progress=False)
    settings = QuantizeSettings(bits=4, group_size=32, held_out_prompts=2, answer_tokens=4)
    manifest = quantize_model(source.directory, str(tmp_path / "ort-int4"), settings, log=lambda line: None)
    for graph in ("embedding", "decoder"):
        kinds = [n.op_type for n in onnx.load(manifest.graph_path(graph), load_external_data=False).graph.node]
        assert "GroupQueryAttention" in kinds and kinds.count("MatMulNBits") == 10  # 2 layers x (qkv, o, gate, up, down)
    assert manifest.data["quantization"]["agreement"]["mean_kl"] < 0.1 and manifest.data["target"] == "onnxruntime"
    with pytest.raises(InputError, match="--target onnxruntime, whose fused ops TensorRT does not parse"):
        quantize_model(source.directory, str(tmp_path / "trt"), QuantizeSettings(group_size=32, target="tensorrt"))
    with Pipeline.from_dir(manifest.directory) as pipe:
        assert isinstance(pipe.generate("what colour is the circle?", max_new_tokens=3), str)


@pytest.mark.slow
def test_tensorrt_form_builds_in_the_real_builder(tiny_portable_export, tmp_path):
    """`hovle-edge build` with TensorRT for RTX ahead of time for SM89 (no GPU needed), every profile."""
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is not installed")
    from hovle_edge.engines.builder import build_engines

    settings = QuantizeSettings(bits=4, group_size=32, target="tensorrt", quantize_head=True, held_out_prompts=0)
    manifest = quantize_model(str(tiny_portable_export), str(tmp_path / "trt"), settings, log=lambda line: None)
    assert manifest.data["quantization"]["target"] == "tensorrt" and manifest.data["opset"] == 21
    assert manifest.data["target"] == "tensorrt"  # still the portable export that `build` takes
    logger = trt.Logger(trt.Logger.ERROR)
    for graph in ("embedding", "decoder"):  # TensorRT sees INT4 weights, not weights folded back to float
        network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        assert parser.parse_from_file(manifest.graph_path(graph)), parser.get_error(0).desc()
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        dequantize = [layer for layer in layers if layer.type == trt.LayerType.DEQUANTIZE]
        assert len(dequantize) == manifest.data["graphs"][graph]["quantized_matmuls"]
        assert {layer.get_input(0).dtype for layer in dequantize} == {trt.DataType.INT4}
    record = build_engines(manifest.directory, str(tmp_path / "engines"), flavour="tensorrt-rtx",
                           compute_capabilities=["8.9"], max_context=64, cache_dir=str(tmp_path / "cache"),
                           log=lambda line: None)
    assert set(record["engines"]) == {"vision", "embedding", "decoder"}
    assert all((tmp_path / "engines" / e["file"]).stat().st_size > 0 for e in record["engines"].values())


@pytest.mark.slow
def test_tensorrt_form_runs_in_onnx_runtime(tiny_portable_export, tmp_path):
    """The opset-21 DequantizeLinear graphs are standard ONNX: ONNX Runtime runs them too."""
    settings = QuantizeSettings(bits=4, group_size=32, target="tensorrt", held_out_prompts=0)
    manifest = quantize_model(str(tiny_portable_export), str(tmp_path / "trt"), settings, log=lambda line: None)
    runner = PrefillRunner(manifest)
    logits, _ = runner.run([1, 5, 9, 12], runner.image_embeds(None))
    assert logits.shape == (manifest.model["vocab"],) and np.isfinite(logits).all()


def test_bad_group_size_is_a_clear_error(tiny_export, tmp_path):
    with pytest.raises(InputError, match="does not divide the input width 64 of embedding.onnx MatMul"):
        quantize_model(str(tiny_export), str(tmp_path / "q"), QuantizeSettings(group_size=128), log=lambda line: None)
    with pytest.raises(InputError, match="power of two"):
        quantize_model(str(tiny_export), str(tmp_path / "q"), QuantizeSettings(group_size=24), log=lambda line: None)
    assert not (tmp_path / "q").exists()
    with pytest.raises(InputError, match="3 bits: choose 4 or 8"):
        QuantizeSettings(bits=3)


def test_a_quantized_folder_is_not_quantized_again(int4_export, tmp_path):
    with pytest.raises(ModelFolderError, match="already quantized"):
        quantize_model(int4_export.directory, str(tmp_path / "twice"), QuantizeSettings(group_size=32))


def test_calibration_folder_of_prompts(tiny_export, tmp_path):
    from hovle_edge.shapes import world as shapes

    folder = tmp_path / "calibration"
    folder.mkdir()
    _, image = shapes.sample(3)
    image.save(folder / "scene.png")
    lines = [{"prompt": "what colour is the star?", "image": "scene.png", "answer": "red"},
             {"prompt": "what number comes after two?"}, {"prompt": "how many things are there?", "image": "scene.png"}]
    (folder / "prompts.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    settings = QuantizeSettings(bits=4, group_size=32, method="awq", calibration=str(folder), held_out_prompts=1,
                                answer_tokens=2)
    manifest = quantize_model(str(tiny_export), str(tmp_path / "q"), settings, log=lambda line: None)
    assert manifest.data["quantization"]["calibration"] == {"source": str(folder), "prompts": 2}
    (folder / "prompts.jsonl").write_text('{"prompt": "a", "image": "missing.png"}\n')
    with pytest.raises(InputError, match="missing.png"):
        quantize_model(str(tiny_export), str(tmp_path / "q2"), settings, log=lambda line: None)


def test_output_folder_is_never_the_source(tiny_export, tmp_path):
    from hovle_edge.errors import OutputFolderError

    with pytest.raises(OutputFolderError, match="is the input"):
        quantize_model(str(tiny_export), str(tiny_export), QuantizeSettings(group_size=32), overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a model")
    with pytest.raises(OutputFolderError, match="did not write"):
        quantize_model(str(tiny_export), str(tmp_path / "mine"), QuantizeSettings(group_size=32), overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_roofline_counts_the_quantized_bytes(tiny_export, int4_export):
    from hovle_edge.profiling.command import model_numbers
    from hovle_edge.profiling.roofline import decode_cost

    float_cost = decode_cost(*model_numbers(str(tiny_export), None)[:2])
    numbers, precision, _ = model_numbers(int4_export.directory, None)
    int4_cost = decode_cost(numbers, precision, numbers["quantization"])
    # 4 layers of 36864 linear weights at 4 bits + an fp32 scale per 32; norms, a word row and the head in fp32
    linear = 4 * 36864
    assert int4_cost.weight_bytes == round(linear * (0.5 + 4 / 32)) + 4 * (4 * 128 + 64 + 64) + 4 * 512 * 64
    assert float_cost.weight_bytes - int4_cost.weight_bytes == 4 * linear - round(linear * (0.5 + 4 / 32))
    assert int4_cost.kv_bytes_per_token == float_cost.kv_bytes_per_token


def test_verify_sends_a_quantized_folder_to_its_agreement(tiny_checkpoint, int4_export):
    from hovle_edge.export.verify import verify_model

    with pytest.raises(ModelFolderError, match="cannot match PyTorch bit for bit: verify the float folder"):
        verify_model(str(tiny_checkpoint), int4_export.directory, progress=False)


def test_quantize_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys\n"
            "class BlockTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('torch is blocked in this test')\n"
            "sys.meta_path.insert(0, BlockTorch())\n"
            "import hovle_edge.quantize, hovle_edge.quantize.agreement, hovle_edge.quantize.calibration\n"
            "hovle_edge.quantize.calibration.shapes_world_samples(2)\n"
            "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
