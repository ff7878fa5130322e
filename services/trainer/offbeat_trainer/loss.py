"""Policy-gradient losses over completion tokens, pluggable by import path.

A loss function gets, for the completion tokens of one micro-batch (flattened, 1-D):
the trainer's log-probs (with grad), the inference log-probs carried by the completions, the
per-token advantage, and a per-token normalisation weight (the step's token- or sequence-level
normalisation, already global over the whole step and all ranks). It returns the weighted loss
of those tokens (the step's loss is the sum over micro-batches) and weighted statistics.

`icepop_loss` (the default): token-level policy gradient with the importance ratio
r = exp(trainer - inference); tokens whose r leaves `[mask_low, mask_high]` are masked (no
gradient, IcePop-style); optional k3 KL term against the inference log-probs. A log-prob gap of
more than ~88.7 nats overflows exp in float32, and a masked inf times 0 is NaN, which AdamW then
spreads to every weight: masked tokens never reach exp, and the KL term and the statistics see the
log-ratio clamped to +-`LOG_RATIO_BOUND`.

Not covered: a separate frozen reference model (the KL term is against the sampling policy).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

LOG_RATIO_BOUND = 20.0
"""Largest |log(trainer / inference)| the KL term and the statistics see (the log-ratio is clamped to
it): exp(20) is about 4.9e8, far outside any sensible mask yet finite in float32 summed over a step.
Beyond it a token's KL term is a constant with no gradient: its log-probs disagree past repair."""


@dataclass(frozen=True)
class LossSettings:
    mask_low: float = 0.125
    mask_high: float = 8.0
    kl_coef: float = 0.0


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Scalar: the sum over tokens of weight * per-token loss."""
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Weighted sums (same weights as the loss), reported as step metrics after summing."""


class LossFn(Protocol):
    def __call__(
        self,
        logp: torch.Tensor,
        inference_logp: torch.Tensor,
        advantages: torch.Tensor,
        weights: torch.Tensor,
        settings: LossSettings,
    ) -> LossOutput: ...


def icepop_loss(
    logp: torch.Tensor,
    inference_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    settings: LossSettings,
) -> LossOutput:
    """-sum_t w_t * m_t * r_t * A_t (+ kl_coef * k3), with m_t = [mask_low <= r_t <= mask_high].

    The gradient of r_t is r_t * grad(logp_t), so with equal log-probs (r = 1) it is exactly the
    plain policy gradient -w_t * A_t * grad(logp_t). A masked token's r_t is taken as exp(0), not
    computed: an r_t of inf (one absurd inference log-prob) times m_t = 0 is NaN in the loss and in
    the gradient, even under `torch.where` after the exp.
    """
    log_ratio = logp - inference_logp
    with torch.no_grad():
        lr = log_ratio.detach()
        ratio = torch.exp(lr)
        kept = (ratio >= settings.mask_low) & (ratio <= settings.mask_high)
        keep = kept.to(logp.dtype)
        bounded = lr.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        mismatch_kl = torch.exp(bounded) - 1.0 - bounded  # k3 estimate of KL(inference || trainer)
    per_token = -torch.exp(torch.where(kept, log_ratio, torch.zeros_like(log_ratio))) * advantages * keep
    if settings.kl_coef > 0:
        neg = -log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # log(inference / trainer)
        k3 = torch.exp(neg) - 1.0 - neg  # k3 estimate of KL(trainer || inference)
        per_token = per_token + settings.kl_coef * k3
    loss = (per_token * weights).sum()
    stats = {
        "mismatch_kl": (mismatch_kl * weights).sum(),
        "masked_fraction": ((1.0 - keep) * weights).sum(),
        "ratio_mean": (torch.exp(bounded) * weights).sum(),
    }
    return LossOutput(loss=loss, stats=stats)


def load_loss(path: str) -> Callable[..., LossOutput]:
    """Import `module:function`."""
    module, sep, name = path.partition(":")
    if not sep:
        raise ValueError(f"loss {path!r}: expected module:function")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise ValueError(f"loss {path!r} is not callable")
    return fn  # type: ignore[no-any-return]


def sft_loss(
    logp: torch.Tensor,
    inference_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    settings: LossSettings,
) -> LossOutput:
    """Supervised fine-tuning: weighted negative log-likelihood of the completion tokens
    (advantages and inference log-probs are ignored)."""
    loss = -(logp * weights).sum()
    return LossOutput(loss=loss, stats={"nll": loss.detach()})
