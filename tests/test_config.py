import json

import pytest
import torch

from hovle_edge.config import HoVLEConfig, preset
from hovle_edge.errors import ConfigError

OFFICIAL = {
    "embedding_config": {"patch_size": 14, "image_size": 448, "hidden_size": 2048, "rope_theta": 1000000.0,
                         "intermediate_size": 8192, "rms_norm_eps": 1e-05, "use_ls": False, "llm_vocab_size": 92553,
                         "llm_hidden_size": 2048, "downsample_ratio": 0.5, "img_context_token_id": 92546,
                         "pixel_shuffle_loc": "pre", "use_pixel_shuffle_proj": True,
                         "special_token_maps": {"<img>": 92544}, "attn_implementation": "flash_attention_2"},
    "llm_config": {"architectures": ["InternLM2ForCausalLM"], "num_hidden_layers": 24, "hidden_size": 2048,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "intermediate_size": 8192,
                   "rope_theta": 1000000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
                   "vocab_size": 92553, "bias": False, "rope_scaling": None, "tie_word_embeddings": False,
                   "model_type": "internlm2"},
    "use_backbone_lora": 0, "use_llm_lora": 0, "pad2square": False, "select_layer": -1, "force_image_size": 448,
    "downsample_ratio": 0.5, "template": "internlm2-chat", "dynamic_image_size": True, "use_thumbnail": True,
    "ps_version": "v2", "min_dynamic_patch": 1, "max_dynamic_patch": 12, "normalize_encoder_output": False,
    "architectures": ["HoVLE"], "auto_map": {"AutoModel": "modeling_hovle.HoVLE"},
}


def test_official_preset_parameter_count():
    from hovle_edge.model import HoVLE

    with torch.device("meta"):
        model = HoVLE(preset("hovle-2.6b"))
    assert sum(p.numel() for p in model.parameters()) == 2_606_327_808
    assert model.config.tokens_per_tile == 256


def test_official_config_round_trip_keeps_unknown_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL))
    config = HoVLEConfig.from_pretrained(str(tmp_path))
    assert config.embedding_config.img_context_token_id == 92546
    assert config.embedding_config.extra["special_token_maps"] == {"<img>": 92544}
    assert config.llm_config.extra["model_type"] == "internlm2"
    config.save_pretrained(str(tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in OFFICIAL.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                assert written[key][sub] == v, (key, sub)
        else:
            assert written[key] == value, key


def test_missing_required_key(tmp_path):
    broken = json.loads(json.dumps(OFFICIAL))
    del broken["embedding_config"]["img_context_token_id"]
    (tmp_path / "config.json").write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match="embedding_config: missing required key.*img_context_token_id"):
        HoVLEConfig.from_pretrained(str(tmp_path))


def test_unsupported_variant_is_named(tmp_path):
    hd = json.loads(json.dumps(OFFICIAL))
    hd["embedding_config"]["pixel_shuffle_loc"] = "post"
    (tmp_path / "config.json").write_text(json.dumps(hd))
    with pytest.raises(ConfigError, match="pixel_shuffle_loc 'post'"):
        HoVLEConfig.from_pretrained(str(tmp_path))


def test_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        HoVLEConfig.from_pretrained(str(tmp_path))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
