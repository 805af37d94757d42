"""Reference generation with PyTorch: prefill once, then decode one token at a time through both
caches. `use_cache=False` recomputes the whole sequence at every step, as the official remote
code does; both give the same tokens. The model is a HoVLE, or a bare InternLM2ForCausalLM (text
only: its own word table feeds it)."""

from __future__ import annotations

import torch

from hovle_edge.model.llm import InternLM2ForCausalLM


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


def forward(model, ids, pixel_values=None, past=None):
    """ids [1, S] after `past` (None: nothing cached) -> (logits [1, S, V], the cache with them)."""
    if isinstance(model, InternLM2ForCausalLM):
        cached = 0 if past is None else past[0][0].shape[2]
        positions = torch.arange(cached, cached + ids.shape[1], device=ids.device)[None]
        mask = torch.ones(1, cached + ids.shape[1], dtype=torch.long, device=ids.device)
        return model(model.model.tok_embeddings(ids), positions, mask, past)
    images = {} if pixel_values is None else {"pixel_values": pixel_values}  # only at the prompt
    out = model(ids, past_key_values=past, **images)
    return out.logits, out.past_key_values


@torch.no_grad()
def generate(model, input_ids, pixel_values=None, max_new_tokens: int = 32, stop_ids=(),
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             use_cache: bool = True, on_token=None) -> list[int]:
    """New token ids for one prompt `input_ids` [1, S] (stop id included when reached). `on_token` is
    called with each id as soon as it is chosen (before the model runs it), so that a caller can time
    the first token and each step."""
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    ids = input_ids
    logits, past = forward(model, ids, pixel_values)
    new_tokens = []
    for _ in range(max_new_tokens):
        token = sample_next(logits[0, -1], temperature, top_k, top_p, generator)
        new_tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop_ids or len(new_tokens) == max_new_tokens:
            break
        step = torch.tensor([[token]], dtype=ids.dtype, device=ids.device)
        if use_cache:
            logits, past = forward(model, step, past=past)
        else:
            ids = torch.cat((ids, step), dim=1)
            logits, _ = forward(model, ids, pixel_values)
    return new_tokens
