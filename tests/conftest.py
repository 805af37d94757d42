import pytest

torch = pytest.importorskip("torch")


def pytest_configure(config):
    # Registered here, the one place: `python -m pytest -m "not slow"` is the developer's fast suite
    # (README, "The tests"); CI runs everything.
    config.addinivalue_line("markers", "slow: several seconds or more on 2 cores (training, large exports, "
                                       "engine builds); left out by -m \"not slow\"")


@pytest.fixture
def tiny_model():
    """A tiny HoVLE with random weights large enough that every path matters."""
    from hovle_edge.config import preset
    from hovle_edge.model import HoVLE

    torch.manual_seed(0)
    model = HoVLE(preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def world_texts():
    """A little text with multi-byte characters, enough to train a tokenizer for tests."""
    return ["a red circle at the top left", "what colour is the square? blue", "how many stars? three",
            "日本語 😀 café ñ"] * 40


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint folder of the tiny preset with random weights and a trained tokenizer."""
    from hovle_edge.config import preset
    from hovle_edge.model import HoVLE
    from hovle_edge.tokenizer import train_tokenizer

    torch.manual_seed(0)
    model = HoVLE(preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(str(path))
    train_tokenizer(world_texts(), 512).save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported for the default target (ONNX Runtime's fused ops, KV written in
    place): what the runtime, CLI, serve and quantize tests run. About 5 s on 2 cores."""
    from hovle_edge.export import export_model

    out = tmp_path_factory.mktemp("exported") / "tiny-fp32"
    export_model(str(tiny_checkpoint), str(out), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_portable_export(tiny_checkpoint, tmp_path_factory):
    """The same checkpoint exported for target "tensorrt" (portable standard ops): what engines, the
    emulated GPU, graph checks and quantize's DequantizeLinear form read. torch.onnx.export takes about
    40 s of it on 2 cores (5 s for tiny_export), so a test that takes it is marked slow."""
    from hovle_edge.export import export_model

    out = tmp_path_factory.mktemp("exported") / "tiny-fp32-portable"
    export_model(str(tiny_checkpoint), str(out), progress=False, target="tensorrt")
    return out
