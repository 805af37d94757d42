"""The reference agrees with an independent implementation: Hugging Face's Llama, into which the
InternLM2 weights are converted by hand (the fused wqkv split per KV head)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")


def split_wqkv(wqkv, heads: int, kv_heads: int):
    """InternLM2's fused rows (kv_head, [q]*groups + [k, v], head_dim) -> q, k, v projections."""
    groups, head_dim = heads // kv_heads, wqkv.shape[0] // (heads + 2 * kv_heads)
    w = wqkv.reshape(kv_heads, groups + 2, head_dim, -1)
    return (w[:, :groups].reshape(heads * head_dim, -1), w[:, groups].reshape(kv_heads * head_dim, -1),
            w[:, groups + 1].reshape(kv_heads * head_dim, -1))


def to_llama(layer_cfg, layers, embed, norm, lm_head, vocab):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=layer_cfg.hidden_size, intermediate_size=layer_cfg.intermediate_size,
        num_hidden_layers=len(layers), num_attention_heads=layer_cfg.num_attention_heads,
        num_key_value_heads=layer_cfg.num_key_value_heads, rms_norm_eps=layer_cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": layer_cfg.rope_theta},
        max_position_embeddings=4096, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    llama = transformers.LlamaForCausalLM(cfg).eval()
    state = {"model.embed_tokens.weight": embed, "model.norm.weight": norm, "lm_head.weight": lm_head}
    for i, layer in enumerate(layers):
        q, k, v = split_wqkv(layer.attention.wqkv.weight, layer_cfg.num_attention_heads, layer_cfg.num_key_value_heads)
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": layer.attention.wo.weight,
            p + "mlp.gate_proj.weight": layer.feed_forward.w1.weight,
            p + "mlp.up_proj.weight": layer.feed_forward.w3.weight,
            p + "mlp.down_proj.weight": layer.feed_forward.w2.weight,
            p + "input_layernorm.weight": layer.attention_norm.weight,
            p + "post_attention_layernorm.weight": layer.ffn_norm.weight,
        })
    llama.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return llama


def test_llm_matches_llama(tiny_model):
    llm = tiny_model.language_model
    cfg = llm.cfg
    llama = to_llama(cfg, llm.model.layers, llm.model.tok_embeddings.weight, llm.model.norm.weight,
                     llm.output.weight, cfg.vocab_size)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        embeds = llm.model.tok_embeddings(ids)
        pos = torch.arange(17).expand(2, 17)
        ours, _ = llm(embeds, pos, torch.ones(2, 17, dtype=torch.long))
        theirs = llama(input_ids=ids).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_text_only_hovle_is_a_32_layer_llama(tiny_model):
    """With equal rope settings, text-only HoVLE is one Llama: embedding layers then LLM layers."""
    emb, llm = tiny_model.embedding_model, tiny_model.language_model
    assert emb.cfg.rope_theta == llm.cfg.rope_theta
    layers = list(emb.encoder) + list(llm.model.layers)
    llama = to_llama(llm.cfg, layers, emb.llm_text_embeddings.weight, llm.model.norm.weight,
                     llm.output.weight, llm.cfg.vocab_size)
    ids = torch.randint(20, llm.cfg.vocab_size, (1, 23))  # no image-context id among them
    with torch.no_grad():
        ours = tiny_model(ids).logits
        theirs = llama(input_ids=ids).logits
    assert (ours - theirs).abs().max() < 1e-4
