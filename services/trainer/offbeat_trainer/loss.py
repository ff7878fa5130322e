"""Policy-gradient losses over completion tokens, pluggable by import path.

A loss function gets, for the completion tokens of one micro-batch (flattened, 1-D):
the trainer's log-probs (with grad), the inference log-probs carried by the completions, the
per-token advantage, and a per-token normalisation weight (the step's token- or sequence-level
normalisation, already global over the whole step and all ranks). It returns the weighted loss
of those tokens (the step's loss is the sum over micro-batches) and weighted statistics.

`icepop_loss` (the default): token-level policy gradient with the importance ratio
r = exp(trainer - inference); tokens whose r leaves `[mask_low, mask_high]` are masked (no
gradient, IcePop-style); optional k3 KL term against the inference log-probs.

Not covered: a separate frozen reference model (the KL term is against the sampling policy).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch


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
    plain policy gradient -w_t * A_t * grad(logp_t).
    """
    log_ratio = logp - inference_logp
    ratio = torch.exp(log_ratio)
    keep = ((ratio >= settings.mask_low) & (ratio <= settings.mask_high)).to(logp.dtype).detach()
    per_token = -ratio * advantages * keep
    with torch.no_grad():
        lr = log_ratio.detach()
        mismatch_kl = torch.exp(lr) - 1.0 - lr  # k3 estimate of KL(inference || trainer)
    if settings.kl_coef > 0:
        neg = -log_ratio  # log(inference / trainer); k3 of KL(trainer || inference)
        per_token = per_token + settings.kl_coef * (torch.exp(neg) - 1.0 - neg)
    loss = (per_token * weights).sum()
    stats = {
        "mismatch_kl": (mismatch_kl * weights).sum(),
        "masked_fraction": ((1.0 - keep) * weights).sum(),
        "ratio_mean": (ratio.detach() * weights).sum(),
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
