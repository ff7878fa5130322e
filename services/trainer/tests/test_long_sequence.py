"""One training step on a 16,384-token trajectory on CPU (65,536 on a GPU)."""

from __future__ import annotations

import pytest
import torch
from offbeat_trainer.batching import Trajectory
from offbeat_trainer.train import CoreSettings, TrainCore, load_model


def _one_step(model_path: str, tokens: int, device: torch.device) -> dict[str, float]:
    model = load_model(model_path)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    core = TrainCore(
        model, CoreSettings(lr=1e-3, micro_batch_tokens=tokens, activation_checkpointing=True), device=device
    )
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 250, (256,), generator=g).tolist()
    completion = torch.randint(5, 250, (tokens - 256,), generator=g).tolist()
    samples = [
        Trajectory("long", "g", 2, prompt, completion, [-5.5] * len(completion), 1.0, "ok", 0, advantage=1.0),
    ]
    metrics = core.step(samples)
    moved = sum(float((p.detach().cpu() - before[k]).abs().sum()) for k, p in core.module.named_parameters())
    assert moved > 0, "the step did not change the parameters"
    assert metrics["tokens"] == tokens and metrics["micro_batches"] == 1
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["grad_norm"] > 0
    return metrics


@pytest.mark.slow
def test_one_step_on_16384_tokens_cpu(tiny_model):  # type: ignore[no-untyped-def]
    _one_step(str(tiny_model), 16_384, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_step_on_65536_tokens_gpu(tiny_model):  # type: ignore[no-untyped-def]
    _one_step(str(tiny_model), 65_536, torch.device("cuda"))
