"""Export on the tiny preset: graphs, manifest, parity at fp32 and fp16, the op checker, and exports
that fail without leaving anything behind."""

import json
import os

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from hovle_edge.errors import CheckpointError, ExportError
from hovle_edge.export import export_model
from hovle_edge.export.ops import check_ops
from hovle_edge.export.verify import verify_model
from hovle_edge.spec import load_manifest, past_names, present_names


def test_folder_contents_and_manifest(tiny_export, tiny_checkpoint):
    manifest = load_manifest(str(tiny_export))
    data = manifest.data
    assert set(data["graphs"]) == {"vision", "embedding", "decoder"}
    for name in ("vision.onnx", "vision.onnx.data", "embedding.onnx.data", "decoder.onnx.data", "tokenizer.json"):
        assert name in data["files"]
    assert data["precision"] == "fp32" and data["opset"] == 18
    assert data["model"]["stacks"] == {
        "embedding": {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 128},
        "llm": {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 128}}
    assert data["model"]["tokens_per_tile"] == 4 and data["tokens"]["img_context"] == 7
    assert data["tokens"]["stop_ids"] == [2, 3, 4]
    assert len(data["checkpoint_sha256"]) == 64
    # Weights live in external data: each graph's .data holds its parameters.
    for name, graph in data["graphs"].items():
        data_bytes = os.path.getsize(tiny_export / f"{name}.onnx.data")
        assert data_bytes >= 0.9 * graph["parameters"] * 4
        assert graph["bytes"] == sum(os.path.getsize(tiny_export / f) for f in graph["files"])


@pytest.mark.slow
def test_graph_io_names_and_named_dims(tiny_portable_export):
    model = onnx.load(str(tiny_portable_export / "embedding.onnx"), load_external_data=False)
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    outputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output}
    assert list(inputs)[:4] == ["input_ids", "image_embeds", "position_ids", "attention_mask"]
    assert list(inputs)[4:] == past_names(2) and list(outputs)[1:] == present_names(2)
    assert inputs["past_key_values.0.key"] == ["batch", 2, "kv_capacity", 16]
    assert outputs["present.1.value"] == ["batch", 2, "sequence", 16]
    assert inputs["attention_mask"] == ["batch", "total_sequence"]
    decoder = onnx.load(str(tiny_portable_export / "decoder.onnx"), load_external_data=False)
    logits = decoder.graph.output[0]
    assert logits.name == "logits" and logits.type.tensor_type.elem_type == TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", 1, 512]


@pytest.mark.slow
def test_no_data_dependent_ops(tiny_portable_export):
    for name in ("vision", "embedding", "decoder"):
        model = onnx.load(str(tiny_portable_export / f"{name}.onnx"), load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        assert not ops & {"NonZero", "If", "Loop", "Scan"}
        check_ops(model, 18, name)


@pytest.mark.slow
def test_parity_and_greedy_tokens_end_to_end(tiny_export, tiny_checkpoint):
    report = verify_model(str(tiny_checkpoint), str(tiny_export), new_tokens=32)
    logits_rows = [r for r in report.rows if r.output == "logits"]
    assert {r.case for r in logits_rows} == {"prefill", "decode", "real"}
    assert all(r.max_abs < 1e-4 for r in logits_rows)
    assert report.ok and len(report.runtime_tokens) == 32 and report.tokens_match


@pytest.mark.slow
def test_fp16_export_runs_and_stays_close(tiny_checkpoint, tmp_path):
    manifest = export_model(str(tiny_checkpoint), str(tmp_path / "fp16"), precision="fp16", progress=False)
    assert manifest.kv_dtype == "float16"
    report = verify_model(str(tiny_checkpoint), str(tmp_path / "fp16"), new_tokens=16)
    logits = [r for r in report.rows if r.output == "logits"]
    # Measured on the tiny model: relative error about 7e-4 of the largest logit; held to 1e-2 here.
    assert all(r.max_rel < 1e-2 for r in logits), [(r.case, r.max_rel) for r in logits]
    assert report.ok


def test_op_checker_rejects_nonzero_and_accepts_ours():
    node = helper.make_node("NonZero", ["x"], ["y"], name="find_image_tokens")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, None])])
    with pytest.raises(ExportError, match=r"find_image_tokens \(NonZero: data-dependent"):
        check_ops(helper.make_model(graph), 18, "hand-made")
    attention = helper.make_node("Attention", ["q", "k", "v"], ["o"], name="fused")
    graph = helper.make_graph([attention], "g", [], [])
    with pytest.raises(ExportError, match="Attention: not supported by TensorRT 10.3 at opset 18"):
        check_ops(helper.make_model(graph), 18, "hand-made")
    check_ops(helper.make_model(graph), 23, "hand-made")  # allowed where the opset brings it


def test_mismatched_checkpoint_leaves_no_folder(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(tiny_checkpoint):
        (broken / f).write_bytes((tiny_checkpoint / f).read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["llm_config"]["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="wrong shape: language_model.model.layers.0.feed_forward.w1.weight"):
        export_model(str(broken), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == ["broken"]


@pytest.mark.slow
def test_failure_mid_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import hovle_edge.export as exporter

    real_check = exporter.check_graph

    def fail(graph, path, *args):
        if graph.name == "embedding":
            raise ExportError("embedding.onnx differs from PyTorch (simulated)")
        return real_check(graph, path, *args)

    monkeypatch.setattr(exporter, "check_graph", fail)
    with pytest.raises(ExportError, match="simulated"):
        export_model(str(tiny_checkpoint), str(tmp_path / "out"), progress=False, target="tensorrt")  # check_graph checks these
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_verify_cli_exit_codes(tiny_export, tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from hovle_edge.cli import main

    result = CliRunner().invoke(main, ["verify", "--checkpoint", str(tiny_checkpoint), "--model", str(tiny_export),
                                       "--new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "decoder    decode     logits" in result.output and "same" in result.output
    # Another checkpoint with the same shapes: the graphs no longer match it, so verify fails.
    from hovle_edge.model import HoVLE

    other = HoVLE.from_pretrained(str(tiny_checkpoint))
    with torch.no_grad():
        other.language_model.output.weight.mul_(1.5)
    other.save_pretrained(str(tmp_path / "other"))
    result = CliRunner().invoke(main, ["verify", "--checkpoint", str(tmp_path / "other"), "--model", str(tiny_export),
                                       "--new-tokens", "8"])
    assert result.exit_code == 1
    assert "logits" in result.output and " no" in result.output
