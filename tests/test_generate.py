"""Cached decoding equals full recomputation; the pixel shuffle follows the official order."""

import torch

from hovle_edge.model import generate
from hovle_edge.model.embedding import pixel_shuffle


def image_prompt(model, tiles: int):
    cfg = model.config
    n = tiles * cfg.tokens_per_tile
    ctx = cfg.embedding_config.img_context_token_id
    return torch.tensor([[1, 5] + [ctx] * n + [6, 40, 41, 42]])


def test_cached_decoding_equals_recomputation_with_image(tiny_model):
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 56, 56)
    ids = image_prompt(tiny_model, tiles=3)
    cached = generate(tiny_model, ids, pixels, max_new_tokens=24)
    recomputed = generate(tiny_model, ids, pixels, max_new_tokens=24, use_cache=False)
    assert len(cached) == 24
    assert cached == recomputed


def test_sampling_with_seed_is_repeatable_and_cache_independent(tiny_model):
    pixels = torch.randn(1, 3, 56, 56)
    ids = image_prompt(tiny_model, tiles=1)
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    a = generate(tiny_model, ids, pixels, **kwargs)
    assert a == generate(tiny_model, ids, pixels, use_cache=False, **kwargs)
    assert a != generate(tiny_model, ids, pixels, **{**kwargs, "seed": 4})


def test_stop_id_ends_generation(tiny_model):
    ids = image_prompt(tiny_model, tiles=0)
    first = generate(tiny_model, ids, max_new_tokens=5)
    assert generate(tiny_model, ids, max_new_tokens=5, stop_ids={first[1]}) == first[:2]


def test_bare_language_model_generates_with_its_cache(tiny_model):
    lm = tiny_model.language_model
    ids = torch.tensor([[1, 5, 40, 41, 42]])
    seen = []
    cached = generate(lm, ids, max_new_tokens=12, on_token=seen.append)
    assert len(cached) == 12 and seen == cached  # every token handed over as it is chosen
    assert cached == generate(lm, ids, max_new_tokens=12, use_cache=False)
    logits, _ = lm(lm.model.tok_embeddings(ids), torch.arange(5)[None], torch.ones_like(ids))
    assert cached[0] == int(logits[0, -1].argmax())


def test_pixel_shuffle_official_order():
    # A 4x4 grid whose patch (r, c) holds the channel pair (r, c): the output tokens list their
    # 2x2 blocks as (2r,2q), (2r,2q+1), (2r+1,2q), (2r+1,2q+1).
    grid = torch.tensor([[[r, c] for c in range(4)] for r in range(4)], dtype=torch.float32)[None]
    out = pixel_shuffle(grid)  # [1, 4, 8]
    assert out.shape == (1, 4, 8)
    assert out[0, 0].tolist() == [0, 0, 0, 1, 1, 0, 1, 1]
    assert out[0, 1].tolist() == [0, 2, 0, 3, 1, 2, 1, 3]  # token (r=0, q=1)
    assert out[0, 2].tolist() == [2, 0, 2, 1, 3, 0, 3, 1]  # token (r=1, q=0)
    assert out[0, 3].tolist() == [2, 2, 2, 3, 3, 2, 3, 3]


def test_image_rows_land_at_context_positions(tiny_model):
    emb = tiny_model.embedding_model
    ctx = emb.cfg.img_context_token_id
    ids = torch.tensor([[9, ctx, 10, ctx], [ctx, 11, 12, 13]])
    rows = torch.randn(3, 64)
    merged = emb.merge(ids, rows)
    assert torch.equal(merged[0, 1], rows[0]) and torch.equal(merged[0, 3], rows[1])
    assert torch.equal(merged[1, 0], rows[2])
    assert torch.equal(merged[1, 1], emb.llm_text_embeddings.weight[11])


def test_position_embedding_resized_for_other_grids(tiny_model):
    vision = tiny_model.embedding_model.vision_embeddings
    out = vision(torch.randn(1, 3, 84, 84))  # 6x6 patches instead of 4x4
    assert out.shape == (1, 6, 6, 64)
