"""TensorRT engines: profiles derived from the manifest, cache keys, engines.json checks and error
paths run everywhere; building and running engines runs only where a GPU and TensorRT (or TensorRT
for RTX) and cuda-python are installed, and skips with the reason elsewhere."""

import importlib.util
import json
import types

import pytest

from hovle_edge.engines import flavours
from hovle_edge.engines.cache import cache_key, check_compatible, read_engines
from hovle_edge.engines.profiles import limits_for
from hovle_edge.errors import EngineBuildError, InputError, ModelFolderError
from hovle_edge.runtime.backends import BackendError
from hovle_edge.spec import load_manifest


@pytest.fixture(scope="module")
def manifest(tiny_export):
    return load_manifest(str(tiny_export))


def test_limits_beyond_the_export_are_refused(manifest):
    with pytest.raises(InputError, match="more than the model was exported for"):
        limits_for(manifest, max_context=10**6)
    with pytest.raises(InputError, match="9 tiles are more than the model takes"):
        limits_for(manifest, max_tiles=9)


def test_cache_key_covers_everything_that_changes_an_engine():
    base = dict(flavour="tensorrt", tensorrt_version="10.3.0", compute_capabilities=["8.7"], graph_sha256="a" * 64,
                profiles=[{"name": "prefill"}], precision="fp16")
    key = cache_key(**base)
    assert key == cache_key(**base)
    for field, other in (("flavour", "tensorrt-rtx"), ("tensorrt_version", "10.15.1"),
                         ("compute_capabilities", ["9.0"]), ("compute_capabilities", ["8.7", "9.0"]),
                         ("graph_sha256", "b" * 64), ("profiles", [{"name": "decode"}]), ("precision", "fp32")):
        assert cache_key(**{**base, field: other}) != key, field


def write_record(folder, **fields) -> dict:
    record = {"format": "hovle-edge/engines", "version": 2, "engines": {}, **fields}
    (folder / "engines.json").write_text(json.dumps(record))
    return read_engines(str(folder))


def test_engines_from_another_gpu_or_version_say_rebuild(tmp_path):
    data = write_record(tmp_path, flavour="tensorrt", tensorrt_version="10.3.0", compute_capabilities=["8.7"], gpu="Orin")
    check_compatible(data, "tensorrt", "10.3.0", "8.7", "here")
    with pytest.raises(ModelFolderError, match=r"built with tensorrt 10.3.0 for compute capability 8.7 \(on Orin\); "
                                               r"this machine has .* compute capability 9.0: rebuild"):
        check_compatible(data, "tensorrt", "10.3.0", "9.0", "here")
    with pytest.raises(ModelFolderError, match="rebuild"):
        check_compatible(data, "tensorrt", "10.15.1", "8.7", "here")


def test_ahead_of_time_engines_run_on_any_architecture_they_were_built_for(tmp_path):
    data = write_record(tmp_path, flavour="tensorrt-rtx", tensorrt_version="1.7.1", compute_capabilities=["8.9", "12.0"],
                        gpu=None)
    for capability in ("8.9", "12.0"):
        check_compatible(data, "tensorrt-rtx", "1.7.1", capability, "here")
    with pytest.raises(ModelFolderError, match=r"for compute capability 8.9, 12.0 \(ahead of time, without a GPU\); "
                                               r"this machine has tensorrt-rtx 1.7.1 and a GPU of compute capability 8.6"):
        check_compatible(data, "tensorrt-rtx", "1.7.1", "8.6", "here")


def test_engines_of_version_1_say_rebuild(tmp_path):
    (tmp_path / "engines.json").write_text(json.dumps({"format": "hovle-edge/engines", "version": 1, "engines": {}}))
    with pytest.raises(ModelFolderError, match="engines of format hovle-edge/engines v1; .* v2: rebuild them"):
        read_engines(str(tmp_path))


def test_build_targets(monkeypatch):
    """Which architectures a build is for: TensorRT for RTX takes named ones with or without a GPU, or
    the GPU's own; standard TensorRT only the GPU's own; each refusal says why."""
    rtx = types.SimpleNamespace(__version__="1.7.1", ComputeCapability=types.SimpleNamespace(
        SM75=0, SM86=1, SM89=2, SM120=3, NONE=4, CURRENT=5))
    here = None
    monkeypatch.setattr(flavours, "gpu_here", lambda: here)
    assert flavours.supported_capabilities(rtx) == ["7.5", "8.6", "8.9", "12.0"]
    assert flavours.build_targets(rtx, "tensorrt-rtx", ["12.0", "8.9", "12.0"]) == flavours.Targets(["8.9", "12.0"], None)
    with pytest.raises(EngineBuildError, match="no GPU here to take a compute capability from") as caught:
        flavours.build_targets(rtx, "tensorrt-rtx", [])
    assert caught.value.setting == "compute_capabilities"  # the CLI names its flag
    with pytest.raises(EngineBuildError, match="cannot build for compute capability 9.0; it builds for 7.5, 8.6"):
        flavours.build_targets(rtx, "tensorrt-rtx", ["9.0"])
    with pytest.raises(EngineBuildError, match="builds engines on the GPU that will run them, and there is no GPU"):
        flavours.build_targets(None, "tensorrt", [])
    here = ("RTX 4090", "8.9")
    assert flavours.build_targets(rtx, "tensorrt-rtx", []) == flavours.Targets(["8.9"], "RTX 4090")
    assert flavours.build_targets(rtx, "tensorrt-rtx", ["12.0"]) == flavours.Targets(["12.0"], "RTX 4090")
    here = ("H200", "9.0")
    assert flavours.build_targets(None, "tensorrt", []) == flavours.Targets(["9.0"], "H200")
    assert flavours.build_targets(None, "tensorrt", ["9.0"]) == flavours.Targets(["9.0"], "H200")
    with pytest.raises(EngineBuildError, match=r"builds only for the GPU it runs on \(H200, compute capability 9.0\), "
                                               r"not for 8.9"):
        flavours.build_targets(None, "tensorrt", ["8.9"])
    with pytest.raises(EngineBuildError, match=r"this GPU \(H200, compute capability 9.0\) is not one tensorrt-rtx builds for"):
        flavours.build_targets(rtx, "tensorrt-rtx", [])


def test_missing_engines_json(tmp_path):
    with pytest.raises(ModelFolderError, match="no engines.json; build engines with `hovle-edge build"):
        read_engines(str(tmp_path))


def test_flavour_detection(monkeypatch):
    present = set()
    monkeypatch.setattr(flavours.importlib.util, "find_spec", lambda name: object() if name in present else None)
    with pytest.raises(BackendError, match="neither tensorrt nor tensorrt_rtx is installed"):
        flavours.pick_flavour(None)
    present.add("tensorrt_rtx")
    assert flavours.pick_flavour(None) == "tensorrt-rtx"
    with pytest.raises(BackendError, match=r"tensorrt is not installed \(pip install 'hovle-edge\[trt\]'\)"):
        flavours.pick_flavour("tensorrt")
    present.add("tensorrt")
    with pytest.raises(BackendError, match="both tensorrt and tensorrt_rtx are installed"):
        flavours.pick_flavour(None)


def test_strongly_typed_is_a_capability_check():
    ten = types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(FP16=1))
    eleven = types.SimpleNamespace(BuilderFlag=types.SimpleNamespace())
    assert not flavours.strongly_typed(ten) and flavours.strongly_typed(eleven)


def test_tensorrt_backend_on_cpu_is_refused(tiny_export):
    from hovle_edge.runtime import Pipeline

    with pytest.raises(BackendError, match="runs on the GPU"):
        Pipeline.from_dir(str(tiny_export), backend="tensorrt", device="cpu")


def gpu_reason():
    if not flavours.installed_flavours():
        return "neither tensorrt nor tensorrt_rtx is installed"
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed"
    try:
        flavours.compute_capability()
    except BackendError as e:
        return f"no usable GPU: {e}"
    return None


@pytest.mark.slow
@pytest.mark.skipif(gpu_reason() is not None, reason=str(gpu_reason()))
def test_engines_give_the_tokens_of_onnxruntime(tiny_portable_export, tmp_path):
    from hovle_edge.engines.builder import build_engines
    from hovle_edge.runtime import Pipeline

    record = build_engines(str(tiny_portable_export), str(tmp_path / "engines"), precision="fp32", max_context=512,
                           cache_dir=str(tmp_path / "cache"), timing_cache=str(tmp_path / "timing.cache"), log=lambda _: None)
    assert set(record["engines"]) == {"vision", "embedding", "decoder"}
    again = build_engines(str(tiny_portable_export), str(tmp_path / "engines2"), precision="fp32", max_context=512,
                          cache_dir=str(tmp_path / "cache"), log=lambda _: None)
    assert [e["cache_key"] for e in again["engines"].values()] == [e["cache_key"] for e in record["engines"].values()]
    question = "what colour is the square?"
    with Pipeline.from_dir(str(tiny_portable_export)) as cpu, Pipeline.from_dir(str(tmp_path / "engines"), backend="tensorrt",
                                                                       device="cuda") as gpu:
        from PIL import Image

        image = Image.new("RGB", (150, 70), "red")
        assert gpu.generate(question, image=image, max_new_tokens=16) == cpu.generate(question, image=image,
                                                                                      max_new_tokens=16)


@pytest.mark.slow
def test_builder_and_backend_on_an_emulated_gpu(tiny_portable_export, tmp_path, monkeypatch):
    """The builder and the TensorRT backend end to end against stand-ins for tensorrt_rtx and cuda-python
    (tests/emulated_gpu.py: ONNX Runtime behind TensorRT's calls, host memory behind cudaMalloc). Shows
    the profiles each step selects, the engine cache, the KV buffers swapping without allocations or
    host copies, and tokens equal to ONNX Runtime's for a generation and a two-turn conversation."""
    from PIL import Image

    from emulated_gpu import install
    from hovle_edge.engines.builder import build_engines
    from hovle_edge.runtime import Pipeline

    memory, ran = install(monkeypatch)
    said = []
    # The first prompts take 205 tokens: a next turn ends past the longest prompt, in the extend profile.
    options = dict(precision="fp32", max_context=256, max_prompt=220, cache_dir=str(tmp_path / "cache"),
                   log=said.append)
    record = build_engines(str(tiny_portable_export), str(tmp_path / "engines"), **options)
    assert (record["flavour"], record["gpu"], record["compute_capabilities"]) == ("tensorrt-rtx", "Emulated GPU", ["8.9"])
    assert [p["name"] for p in record["engines"]["decoder"]["profiles"]] == ["decode", "prefill", "extend"]
    said.clear()
    build_engines(str(tiny_portable_export), str(tmp_path / "again"), **options)
    assert said == [f"{g}: unchanged, taken from the engine cache" for g in ("vision", "embedding", "decoder")]

    image = Image.new("RGB", (150, 70), "red")
    with Pipeline.from_dir(str(tiny_portable_export)) as cpu, Pipeline.from_dir(str(tmp_path / "engines"), backend="tensorrt",
                                                                       device="cuda") as gpu:
        chat = gpu.conversation()  # its KV buffers are allocated here, at its capacity
        allocated = memory.allocations
        memory.to_host.clear()
        assert "".join(chat.ask("what colour?", image=image, max_new_tokens=12)) == \
            cpu.generate("what colour?", image=image, max_new_tokens=12)
        assert memory.allocations == allocated  # nothing allocated per step
        # To the host: the vision graph's image tokens once, then only one row of logits per step.
        assert set(memory.to_host[1:]) == {4 * gpu.manifest.model["vocab"]}, memory.to_host
        del chat
        assert not gpu.backend.kv_allocations  # a finished conversation's caches are freed
        ran.clear()
        turns = [("what shape?", image), ("and its colour?", None)]
        on_gpu, on_cpu = gpu.conversation(), cpu.conversation()
        for question, picture in turns:
            assert "".join(on_gpu.ask(question, image=picture, max_new_tokens=8)) == \
                "".join(on_cpu.ask(question, image=picture, max_new_tokens=8))
    profiles = {index for graph, index in ran if graph == "decoder.onnx"}
    assert profiles == {0, 1, 2}  # decode steps, prefill, and the second turn's extend


@pytest.mark.slow
def test_runtime_cache_keeps_jit_kernels_for_the_next_start(tiny_portable_export, tmp_path, monkeypatch):
    """TensorRT for RTX compiles kernels on the GPU the first time a context runs them; the backend
    saves them on close (runtime.cache beside the engines) and the next start compiles nothing it
    already has. Emulated: a kernel is a (graph, profile) pair."""
    import sys

    from emulated_gpu import install
    from hovle_edge.engines.builder import build_engines
    from hovle_edge.runtime import Pipeline

    install(monkeypatch)
    compiled = sys.modules["tensorrt_rtx"].compiled
    engines = tmp_path / "engines"
    build_engines(str(tiny_portable_export), str(engines), precision="fp32", max_context=256, max_prompt=220,
                  cache_dir=str(tmp_path / "cache"), log=lambda _: None)
    with Pipeline.from_dir(str(engines), backend="tensorrt", device="cuda") as gpu:
        assert not gpu.backend.runtime_cache.loaded
        gpu.generate("what colour?", max_new_tokens=4)
    first = list(compiled)
    assert {"embedding.onnx:0", "embedding.onnx:1", "decoder.onnx:0", "decoder.onnx:1"} <= set(first)  # decode, prefill
    assert (engines / "runtime.cache").is_file()
    with Pipeline.from_dir(str(engines), backend="tensorrt", device="cuda") as gpu:
        assert gpu.backend.runtime_cache.loaded
        gpu.generate("what colour?", max_new_tokens=4)
    assert compiled == first  # nothing compiled again
    (engines / "runtime.cache").write_bytes(b"from another GPU")  # refused by TensorRT: compiled afresh, not an error
    with Pipeline.from_dir(str(engines), backend="tensorrt", device="cuda") as gpu:
        assert not gpu.backend.runtime_cache.loaded
        gpu.generate("what colour?", max_new_tokens=4)
    assert len(compiled) == 2 * len(first)
