"""Save, load and compare; every broken checkpoint fails with a message that names the problem."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hovle_edge.errors import CheckpointError, ConfigError
from hovle_edge.model import HoVLE


def logits_of(model):
    ids = torch.arange(10, 30).reshape(1, 20)
    ids[0, 3:7] = model.config.embedding_config.img_context_token_id
    pixels = torch.linspace(-1, 1, 3 * 56 * 56).reshape(1, 3, 56, 56)
    with torch.no_grad():
        return model(ids, pixel_values=pixels).logits


@pytest.mark.parametrize("max_shard_bytes", [2**30, 200_000])
def test_save_load_identical_logits(tiny_model, tmp_path, max_shard_bytes):
    tiny_model.save_pretrained(str(tmp_path / "ckpt"), max_shard_bytes=max_shard_bytes)
    sharded = os.path.exists(tmp_path / "ckpt" / "model.safetensors.index.json")
    assert sharded == (max_shard_bytes < 2**30)
    loaded = HoVLE.from_pretrained(str(tmp_path / "ckpt"))
    assert torch.equal(logits_of(tiny_model), logits_of(loaded))


def test_official_tensor_names(tiny_model):
    names = set(tiny_model.state_dict())
    for name in ["embedding_model.vision_embeddings.class_embedding",
                 "embedding_model.vision_embeddings.patch_embedding.weight",
                 "embedding_model.vision_embeddings.position_embedding",
                 "embedding_model.llm_text_embeddings.weight",
                 "embedding_model.encoder.1.attention.wqkv.weight",
                 "embedding_model.encoder.0.feed_forward.w2.weight",
                 "embedding_model.pixel_shuffle_proj.2.bias",
                 "language_model.model.tok_embeddings.weight",
                 "language_model.model.layers.1.ffn_norm.weight",
                 "language_model.model.norm.weight", "language_model.output.weight"]:
        assert name in names


@pytest.fixture
def saved(tiny_model, tmp_path):
    path = tmp_path / "ckpt"
    tiny_model.save_pretrained(str(path))
    return path


def rewrite(path, change):
    state = load_file(str(path / "model.safetensors"))
    change(state)
    save_file(state, str(path / "model.safetensors"))


def test_missing_tensor(saved):
    rewrite(saved, lambda s: s.pop("language_model.model.norm.weight"))
    with pytest.raises(CheckpointError, match="missing: language_model.model.norm.weight"):
        HoVLE.from_pretrained(str(saved))


def test_extra_tensor(saved):
    rewrite(saved, lambda s: s.update({"language_model.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="unexpected: language_model.extra.weight"):
        HoVLE.from_pretrained(str(saved))


def test_wrong_shape(saved):
    rewrite(saved, lambda s: s.update({"language_model.output.weight": torch.zeros(5, 64)}))
    with pytest.raises(CheckpointError, match=r"wrong shape: language_model.output.weight is \[5, 64\], expected \[512, 64\]"):
        HoVLE.from_pretrained(str(saved))


def test_truncated_shard(tiny_model, tmp_path):
    path = tmp_path / "ckpt"
    tiny_model.save_pretrained(str(path), max_shard_bytes=200_000)
    shard = sorted(p for p in os.listdir(path) if p.startswith("model-"))[0]
    data = (path / shard).read_bytes()
    (path / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard}: not a readable safetensors file"):
        HoVLE.from_pretrained(str(path))


def test_missing_shard(tiny_model, tmp_path):
    path = tmp_path / "ckpt"
    tiny_model.save_pretrained(str(path), max_shard_bytes=200_000)
    shards = sorted(p for p in os.listdir(path) if p.startswith("model-"))
    os.remove(path / shards[-1])
    with pytest.raises(CheckpointError, match="shard named in model.safetensors.index.json is missing"):
        HoVLE.from_pretrained(str(path))


def test_not_safetensors(saved):
    (saved / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        HoVLE.from_pretrained(str(saved))


def test_no_weights_at_all(saved):
    os.remove(saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        HoVLE.from_pretrained(str(saved))


def test_config_mismatching_weights(saved):
    config = json.loads((saved / "config.json").read_text())
    config["llm_config"]["num_hidden_layers"] = 3
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing: language_model.model.layers.2.attention.wqkv.weight"):
        HoVLE.from_pretrained(str(saved))


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        HoVLE.from_pretrained(str(tmp_path / "empty"))
