"""The next-token loss every language stage (and the shapes world's LM) trains on."""

from __future__ import annotations

import torch.nn.functional as F

from hovle_edge.train.data import IGNORE


def next_token_loss(logits, labels):
    """Mean cross entropy of predicting labels[t+1] at t; returns (loss, counted tokens)."""
    target = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)
    return loss, (target != IGNORE).sum()
