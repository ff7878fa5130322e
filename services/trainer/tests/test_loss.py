"""The loss: plain policy gradient when log-probs agree, no gradient outside the mask, hand case."""

from __future__ import annotations

import math

import pytest
import torch
from offbeat_trainer.loss import LossSettings, icepop_loss, load_loss


def test_equal_logprobs_give_plain_policy_gradient():
    torch.manual_seed(0)
    logits = torch.randn(7, 11, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    adv = torch.randn(7)
    w = torch.full((7,), 1 / 7)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    out = icepop_loss(logp, logp.detach().clone(), adv, w, LossSettings())
    (g_ours,) = torch.autograd.grad(out.loss, logits, retain_graph=True)
    plain = -(adv * w * logp).sum()
    (g_plain,) = torch.autograd.grad(plain, logits)
    assert torch.allclose(g_ours, g_plain, atol=1e-7), (g_ours - g_plain).abs().max()
    assert out.stats["masked_fraction"].item() == 0.0
    assert out.stats["mismatch_kl"].item() == pytest.approx(0.0, abs=1e-7)


def test_tokens_outside_mask_bounds_get_no_gradient():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5])).requires_grad_()
    # ratios 0.1 (below 0.125), 1, 9 (above 8), 8 (on the bound: kept)
    inf = torch.log(torch.tensor([5.0, 0.5, 0.5 / 9, 0.5 / 8]))
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0])
    out = icepop_loss(logp, inf, adv, torch.full((4,), 0.25), LossSettings(mask_low=0.125, mask_high=8.0))
    out.loss.backward()
    assert logp.grad is not None
    assert logp.grad[0] == 0 and logp.grad[2] == 0, logp.grad
    assert logp.grad[1] != 0 and logp.grad[3] != 0, logp.grad
    assert out.stats["masked_fraction"].item() == pytest.approx(0.5)


def test_hand_computed_case():
    # trainer probs 0.5, 0.2, 0.9; inference probs 0.25, 0.2, 0.05 -> ratios 2, 1, 18 (masked)
    # advantages 1, -0.5, 1; token weights 0.5 each.
    # loss = -(0.5 * 2 * 1 + 0.5 * 1 * -0.5) = -0.75
    # d loss / d logp_t = -w_t * r_t * A_t = [-1.0, 0.25, 0]
    # mismatch_kl (k3) = sum_t w_t (r_t - 1 - ln r_t) over all tokens
    #                  = 0.5 * (1 - ln 2) + 0 + 0.5 * (17 - ln 18)
    logp = torch.log(torch.tensor([0.5, 0.2, 0.9], dtype=torch.float64)).requires_grad_()
    inf = torch.log(torch.tensor([0.25, 0.2, 0.05], dtype=torch.float64))
    adv = torch.tensor([1.0, -0.5, 1.0], dtype=torch.float64)
    w = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    out = icepop_loss(logp, inf, adv, w, LossSettings())
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-0.75, abs=1e-12)
    assert logp.grad is not None
    assert logp.grad.tolist() == pytest.approx([-1.0, 0.25, 0.0], abs=1e-12)
    expected_kl = 0.5 * (1 - math.log(2)) + 0.5 * (17 - math.log(18))
    assert out.stats["mismatch_kl"].item() == pytest.approx(expected_kl, abs=1e-12)
    assert out.stats["masked_fraction"].item() == pytest.approx(0.5)


def test_kl_term_pulls_towards_inference_policy():
    # with zero advantages only the KL term acts; its gradient at ratio r is
    # kl_coef * w * (1 - 1/r): positive above r = 1 (push logp down), negative below
    logp = torch.log(torch.tensor([0.5, 0.1], dtype=torch.float64)).requires_grad_()
    inf = torch.log(torch.tensor([0.25, 0.2], dtype=torch.float64))
    out = icepop_loss(
        logp,
        inf,
        torch.zeros(2, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
        LossSettings(kl_coef=0.1),
    )
    out.loss.backward()
    assert logp.grad is not None
    assert logp.grad.tolist() == pytest.approx([0.1 * (1 - 0.5), 0.1 * (1 - 2.0)], abs=1e-12)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_an_absurd_logprob_gap_is_masked_without_nan_and_leaves_the_other_gradients_alone(kl_coef):
    # an inference log-prob of -1e4 (ratio exp(1e4) = inf) and a trainer log-prob ~200 nats below
    # its inference one (exp(200) in the KL term): inf * 0 once made the loss and every weight NaN
    torch.manual_seed(0)
    logits = torch.randn(5, 11)
    targets = torch.randint(0, 11, (5,))
    logits[3, targets[3]] = -200.0
    logits.requires_grad_()
    logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    inf = logp.detach() + torch.tensor([0.3, -0.2, 0.0, 0.0, 0.1])
    inf[2], inf[3] = -1e4, 0.0
    adv, w = torch.tensor([1.0, -0.5, 1.0, -1.0, 0.7]), torch.full((5,), 0.2)
    settings = LossSettings(kl_coef=kl_coef)
    out = icepop_loss(logp, inf, adv, w, settings)
    (grad,) = torch.autograd.grad(out.loss, logits, retain_graph=True)
    assert math.isfinite(out.loss.item()) and torch.isfinite(grad).all(), (out.loss, grad)
    assert all(math.isfinite(v.item()) for v in out.stats.values()), out.stats
    assert out.stats["masked_fraction"].item() == pytest.approx(0.4)
    assert grad[2].abs().max() == 0 and grad[3].abs().max() == 0, grad

    good = torch.tensor([0, 1, 4])
    unweighted = icepop_loss(logp, inf, adv, w * torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]), settings)
    (grad_unweighted,) = torch.autograd.grad(unweighted.loss, logits, retain_graph=True)
    without = icepop_loss(logp[good], inf[good], adv[good], w[good], settings)
    (grad_without,) = torch.autograd.grad(without.loss, logits)
    assert torch.equal(grad, grad_unweighted), (grad, grad_unweighted)
    assert torch.allclose(grad, grad_without, atol=1e-7), (grad - grad_without).abs().max()


def test_loss_is_pluggable_by_import_path():
    assert load_loss("offbeat_trainer.loss:icepop_loss") is icepop_loss
    with pytest.raises(ValueError):
        load_loss("offbeat_trainer.loss")
