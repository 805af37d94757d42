"""Reference generation with PyTorch: prefill once, then decode one token at a time through both
caches. `use_cache=False` recomputes the whole sequence at every step, as the official remote
code does; both give the same tokens."""

from __future__ import annotations

import torch


def sample_next(logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator=None):
    """logits [V] -> token id. temperature 0 is greedy."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p  # always keeps the first
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model, input_ids, pixel_values=None, max_new_tokens: int = 32, stop_ids=(),
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             use_cache: bool = True) -> list[int]:
    """New token ids for one prompt `input_ids` [1, S] (stop id included when reached)."""
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    ids = input_ids
    out = model(ids, pixel_values=pixel_values)
    new_tokens = []
    for _ in range(max_new_tokens):
        token = sample_next(out.logits[0, -1], temperature, top_k, top_p, generator)
        new_tokens.append(token)
        if token in stop_ids:
            break
        step = torch.tensor([[token]], dtype=ids.dtype, device=ids.device)
        ids = torch.cat((ids, step), dim=1)
        if use_cache:
            out = model(step, past_key_values=out.past_key_values)
        else:
            out = model(ids, pixel_values=pixel_values)
    return new_tokens
