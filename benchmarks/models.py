"""Random-weight models of chosen widths for the benchmarks: a checkpoint and its export, cached in a
work folder so that repeated runs measure and do not rebuild. Speed does not depend on the weights."""

from __future__ import annotations

import os

from hovle_edge.config import EmbeddingConfig, HoVLEConfig, LLMConfig

SIZES = {
    # name: (width, layers per stack, heads, kv heads, mlp, vocab)
    "w512": (512, 8, 8, 4, 2048, 16384),
    "w1024": (1024, 8, 16, 8, 4096, 32768),
}


def benchmark_config(name: str) -> HoVLEConfig:
    width, layers, heads, kv_heads, mlp, vocab = SIZES[name]
    layer = dict(hidden_size=width, num_attention_heads=heads, num_key_value_heads=kv_heads,
                 intermediate_size=mlp, num_hidden_layers=layers, rope_theta=1e6)
    return HoVLEConfig(
        embedding_config=EmbeddingConfig(image_size=112, patch_size=14, llm_hidden_size=width, llm_vocab_size=vocab,
                                          img_context_token_id=7, **layer),
        llm_config=LLMConfig(vocab_size=vocab, max_position_embeddings=4096, **layer),
        force_image_size=112, max_dynamic_patch=12)


def prepared(name: str, work: str, precision: str = "fp32") -> tuple[str, str]:
    """(checkpoint folder, exported model folder) for size `name`, built once under `work`."""
    import torch

    from hovle_edge.export import export_model
    from hovle_edge.model import HoVLE
    from hovle_edge.shapes.world import world_tokenizer

    checkpoint = os.path.join(work, f"{name}-checkpoint")
    model_dir = os.path.join(work, f"{name}-{precision}")
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        torch.manual_seed(0)
        model = HoVLE(benchmark_config(name))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.save_pretrained(checkpoint)
        world_tokenizer().save(checkpoint)
    if not os.path.isfile(os.path.join(model_dir, "manifest.json")):
        export_model(checkpoint, model_dir, precision=precision, max_context=4096, overwrite=True)
    return checkpoint, model_dir
