"""Batched token sampling for the transformers engine: temperature, top-k, top-p, per-sample seeds.

One call samples the next token of every row of a decode batch, each row with its own settings,
and returns the log-prob of each sampled token under `log_softmax(logits / T)` (T = 0: greedy,
log-prob under `log_softmax(logits)`), i.e. BEFORE top-k/top-p truncation (see `engine.py`).
Randomness comes from one `random.Random` per sequence (seeded by the request's seed + sample
index, or from the OS), so a seeded sample is reproducible whatever else is in the batch.

Not covered: repetition penalties, logit biases, beam search.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowSampling:
    temperature: float
    top_p: float
    top_k: int
    rng: random.Random


def sample(logits: torch.Tensor, rows: list[RowSampling]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of `logits` [B, V]; returns (token ids [B], log-probs [B])."""
    logits = logits.float()
    device = logits.device
    temps = torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=device)
    greedy = temps <= 0
    # shifted so the row's top logit is 0 before scaling: nothing overflows for any T > 0
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    scaled = shifted / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    tokens = torch.argmax(scaled, dim=-1)
    if not bool(greedy.all()):
        uniform = torch.tensor([r.rng.random() for r in rows], dtype=torch.float64, device=device)
        vocab = logits.shape[-1]
        truncated = any(0 < r.top_k < vocab or r.top_p < 1.0 for r in rows if r.temperature > 0)
        if truncated:
            drawn = _sample_truncated(logprobs, rows, uniform)
        else:
            drawn = _inverse_cdf(logprobs.exp(), uniform)
        tokens = torch.where(greedy, tokens, drawn)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
    return tokens, chosen


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    cdf = probs.double().cumsum(dim=-1)
    target = (uniform * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]
    return idx.clamp(max=probs.shape[-1] - 1)


def _sample_truncated(logprobs: torch.Tensor, rows: list[RowSampling], uniform: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p on the sorted distribution (at least one token kept), then sample."""
    vocab = logprobs.shape[-1]
    device = logprobs.device
    sorted_lp, order = torch.sort(logprobs, dim=-1, descending=True)
    probs = sorted_lp.exp()
    rank = torch.arange(vocab, device=device)[None, :]
    top_k = torch.tensor([r.top_k if 0 < r.top_k < vocab else vocab for r in rows], device=device)
    keep = rank < top_k[:, None]
    probs = probs * keep
    top_p = torch.tensor([r.top_p if 0 < r.top_p < 1.0 else 1.0 for r in rows], device=device)
    mass_before = probs.cumsum(dim=-1) - probs
    keep_p = mass_before < top_p[:, None] * probs.sum(dim=-1, keepdim=True)
    keep_p[:, 0] = True
    probs = probs * keep_p
    idx = _inverse_cdf(probs, uniform)
    return order.gather(-1, idx[:, None])[:, 0]
