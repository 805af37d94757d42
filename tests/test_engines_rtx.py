"""The real TensorRT for RTX builder, which builds engines ahead of time on a machine without a GPU:
the tiny model at fp32 and fp16, all three graphs with every profile of engines/profiles.py, for two
compute capabilities at once; the engine cache; no timing cache; a graph TensorRT cannot parse.
Running the engines needs a GPU (test_engines.py). Skips only where tensorrt_rtx is not installed.

Limits are tiny (context 64, prompt 32) so that the builds stay quick on 2 cores."""

import os

import pytest

trt = pytest.importorskip("tensorrt_rtx")

from hovle_edge.engines.builder import build_engines, make_logger, parse  # noqa: E402
from hovle_edge.engines.flavours import build_targets, gpu_here, supported_capabilities  # noqa: E402
from hovle_edge.engines.profiles import graph_profiles, limits_for  # noqa: E402
from hovle_edge.errors import EngineBuildError  # noqa: E402
from hovle_edge.spec import load_manifest  # noqa: E402

LIMITS = dict(max_context=64, max_prompt=32)
TARGETS = ["8.9", "12.0"]  # Ada and Blackwell: one engine file runs on both


@pytest.fixture(scope="module")
def tiny_export_fp16(tiny_checkpoint, tmp_path_factory):
    from hovle_edge.export import export_model

    out = tmp_path_factory.mktemp("exported") / "tiny-fp16"
    export_model(str(tiny_checkpoint), str(out), precision="fp16", max_context=64, progress=False, target="tensorrt")
    return out


@pytest.fixture(scope="module")
def builds(tiny_portable_export, tiny_export_fp16, tmp_path_factory):
    """Both precisions built once, sharing an engine cache (and asked to keep a timing cache)."""
    work = tmp_path_factory.mktemp("rtx")
    said, records = [], {}
    for precision, folder in (("fp32", tiny_portable_export), ("fp16", tiny_export_fp16)):
        records[precision] = build_engines(str(folder), str(work / precision), precision=precision,
                                           compute_capabilities=TARGETS, cache_dir=str(work / "cache"),
                                           timing_cache=str(work / "timing.cache"), log=said.append, **LIMITS)
    return work, records, said


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_graph_and_profile_builds_without_a_gpu(builds, tiny_portable_export, precision):
    work, records, _ = builds
    record = records[precision]
    assert record["compute_capabilities"] == TARGETS
    assert record["gpu"] == (gpu_here() or (None,))[0]  # None on a machine without a GPU
    manifest = load_manifest(str(tiny_portable_export))
    limits = limits_for(manifest, **LIMITS)
    for graph in ("vision", "embedding", "decoder"):
        entry = record["engines"][graph]
        expected = [p.to_json() for p in graph_profiles(graph, manifest, limits)]
        assert entry["profiles"] == expected
        assert os.path.getsize(work / precision / entry["file"]) == entry["bytes"] > 0
        assert not entry["from_cache"]


@pytest.mark.slow
def test_a_second_build_is_an_engine_cache_hit(builds, tiny_portable_export, tmp_path):
    work, records, _ = builds
    said = []
    again = build_engines(str(tiny_portable_export), str(tmp_path / "again"), precision="fp32", compute_capabilities=TARGETS,
                          cache_dir=str(work / "cache"), log=said.append, **LIMITS)
    assert said == [f"{g}: unchanged, taken from the engine cache" for g in ("vision", "embedding", "decoder")]
    for graph, entry in again["engines"].items():
        assert entry["from_cache"] and entry["sha256"] == records["fp32"]["engines"][graph]["sha256"]


@pytest.mark.slow
def test_tensorrt_rtx_keeps_no_timing_cache(builds):
    """Its timing cache calls are no-ops (it compiles kernels on the GPU that runs them, into the
    runtime cache: tested on the emulated GPU in test_engines.py); the builder says so and leaves the
    file alone."""
    work, _, said = builds
    assert not (work / "timing.cache").exists()
    assert sum("keeps no timing cache" in line for line in said) == 2  # once per build


def test_unknown_op_names_the_failing_node(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("HovleNoSuchOp", ["x"], ["y"], name="the_mystery_node")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "unknown.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    logger = make_logger(trt)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    with pytest.raises(EngineBuildError, match=r"unknown.onnx: TensorRT could not parse it:\n.*the_mystery_node.*HovleNoSuchOp"):
        parse(trt, network, str(path), logger)


def test_targets_without_a_gpu_must_be_named():
    if gpu_here() is not None:
        pytest.skip("a GPU is here: its own compute capability is the default")
    with pytest.raises(EngineBuildError, match="no GPU here to take a compute capability from") as caught:
        build_targets(trt, "tensorrt-rtx", [])
    assert caught.value.setting == "compute_capabilities"
    with pytest.raises(EngineBuildError, match="cannot build for compute capability 9.0; it builds for .*8.9"):
        build_targets(trt, "tensorrt-rtx", ["9.0", "8.9"])
    assert set(TARGETS) <= set(supported_capabilities(trt))


@pytest.mark.slow
def test_cli_asks_for_the_flag_without_a_gpu(tiny_portable_export, tmp_path):
    from click.testing import CliRunner

    from hovle_edge.cli import main

    if gpu_here() is not None:
        pytest.skip("a GPU is here: its own compute capability is the default")
    result = CliRunner().invoke(main, ["build", "--model", str(tiny_portable_export), "--out", str(tmp_path / "engines"),
                                       "--flavour", "tensorrt-rtx"])
    assert result.exit_code == 2
    assert "--compute-capability" in result.output and "no GPU here" in result.output
    assert not (tmp_path / "engines").exists()
