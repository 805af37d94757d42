import pytest

torch = pytest.importorskip("torch")


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
