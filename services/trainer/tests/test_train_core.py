"""`TrainCore` against a plain AdamW loop: saving the state must not change the optimisation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from offbeat_trainer.batching import Trajectory
from offbeat_trainer.train import CoreSettings, TrainCore, load_model


def _samples() -> list[Trajectory]:
    return [
        Trajectory(
            trajectory_id=f"t{i}",
            group_id="g",
            group_size=4,
            prompt_ids=[5 + i, 9, 13],
            completion_ids=[20 + i, 31, 42, 7],
            inference_logprobs=[-5.5] * 4,
            reward=float(i % 2),
            status="ok",
            oldest_version=0,
            advantage=float(i % 2) - 0.5,
        )
        for i in range(4)
    ]


def test_saving_the_state_of_a_fresh_core_does_not_shift_its_first_adam_step(tiny_model):
    # the trainer saves a checkpoint (full_state) before its first step; torch's get_state_dict
    # initialises an empty optimizer with a zero-lr step, which used to leave AdamW at step 1
    settings = CoreSettings(lr=1e-2)
    plain = TrainCore(load_model(str(tiny_model)), settings)
    saved = TrainCore(load_model(str(tiny_model)), settings)
    _, optim_sd = saved.full_state()
    assert all(int(s["step"]) == 0 for s in optim_sd["state"].values()), "saved optimizer state has steps"
    for _ in range(2):
        plain.step(_samples())
        saved.step(_samples())
    for (name, a), b in zip(plain.module.named_parameters(), saved.module.parameters(), strict=True):
        assert torch.equal(a, b), f"{name} differs by {(a - b).abs().max().item():.2e} after two steps"


def test_the_learning_rate_warms_up_then_follows_its_cosine_down_to_the_floor(tiny_model):
    core = TrainCore(
        load_model(str(tiny_model)), CoreSettings(lr=1e-3, warmup_steps=2, decay_steps=6, min_lr_ratio=0.1)
    )
    used = []
    for _ in range(8):
        used.append(core.optimizer.param_groups[0]["lr"])
        core.step(_samples())
    expected = [5e-4, 1e-3, 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1 / 4)))]
    assert used[:3] == pytest.approx(expected)
    assert used[5:] == pytest.approx([1e-4] * 3), "not at the floor from the decay's last step on"
    assert all(a >= b for a, b in itertools.pairwise(used[1:])), used
    constant = TrainCore(load_model(str(tiny_model)), CoreSettings(lr=1e-3, warmup_steps=2))
    for _ in range(3):
        constant.step(_samples())
    assert constant.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_leaving_zero_advantage_samples_out_of_the_pass_gives_the_same_update(tiny_model):
    samples = _samples() + [
        Trajectory(
            trajectory_id=f"z{i}",
            group_id="all-right",
            group_size=2,
            prompt_ids=[7, 8, 9 + i],
            completion_ids=[11, 12 + i],
            inference_logprobs=[-5.5] * 2,
            reward=1.0,
            status="ok",
            oldest_version=0,
            advantage=0.0,
        )
        for i in range(2)
    ]
    cores = []
    for skip in (True, False):
        core = TrainCore(load_model(str(tiny_model)), CoreSettings(lr=1e-2))
        assert core.skips_zero_advantage
        core.skips_zero_advantage = skip
        cores.append((core, core.step(samples)))
    (skipping, fast), (full, slow) = cores
    assert fast["trained_sequences"] == 4 and slow["trained_sequences"] == 6
    assert fast["loss"] == pytest.approx(slow["loss"], abs=1e-7)
    for (name, a), b in zip(skipping.module.named_parameters(), full.module.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), f"{name} differs by {(a - b).abs().max().item():.2e}"
    assert not any(
        torch.equal(a, b)
        for a, b in zip(full.module.parameters(), load_model(str(tiny_model)).parameters(), strict=True)
    ), "nothing trained"
    with_kl = TrainCore(load_model(str(tiny_model)), CoreSettings(kl_coef=0.1))
    assert not with_kl.skips_zero_advantage, "the KL term has a gradient at advantage 0"


def test_a_light_checkpoint_restores_the_weights_and_schedule_exactly_and_older_moments(tiny_model, tmp_path):
    from offbeat_trainer.checkpoint import Checkpoints, TrainerState, save_weights

    ckpts = Checkpoints(tmp_path, keep=3)
    core = TrainCore(load_model(str(tiny_model)), CoreSettings(lr=1e-2))
    core.step(_samples())
    model_sd, optim_sd = core.full_state()
    moments_at_1 = {k: v["exp_avg"].clone() for k, v in optim_sd["state"].items()}
    w = save_weights(model_sd, tmp_path / ".w.safetensors")
    ckpts.save(
        TrainerState(step=1), weights_file=w, optimizer=optim_sd, scheduler=core.scheduler.state_dict()
    )
    for _ in range(2):
        core.step(_samples())
    light_sd = core.model_state()
    assert light_sd.keys() == core.full_state()[0].keys()
    w = save_weights(light_sd, tmp_path / ".w.safetensors")
    name = ckpts.save(
        TrainerState(step=3), weights_file=w, optimizer=None, scheduler=core.scheduler.state_dict()
    )

    resumed = TrainCore(load_model(str(tiny_model)), CoreSettings(lr=1e-2))
    resumed.load_checkpoint(str(tmp_path / name))
    for (key, a), b in zip(core.module.named_parameters(), resumed.module.parameters(), strict=True):
        assert torch.equal(a, b), key
    assert resumed.scheduler.last_epoch == core.scheduler.last_epoch == 3
    restored = resumed.full_state()[1]["state"]
    now = core.full_state()[1]["state"]
    assert not all(torch.equal(now[k]["exp_avg"], m) for k, m in moments_at_1.items())
    assert all(torch.equal(restored[k]["exp_avg"], m) for k, m in moments_at_1.items())
    assert all(int(s["step"]) == 1 for s in restored.values())


@pytest.mark.parametrize("full", [True, False], ids=["full", "light"])
def test_a_snapshot_keeps_its_step_while_the_next_step_trains(tiny_model, full):
    # the trainer writes step N's checkpoint from the snapshot while step N+1 updates the live
    # tensors in place; a snapshot that shared their storage would save a mix of the two steps
    core = TrainCore(load_model(str(tiny_model)), CoreSettings(lr=1e-2))
    core.step(_samples())
    model_sd, optim_sd = core.snapshot(full)
    expected_model = {k: v.clone() for k, v in core.model_state().items()}
    expected_state = {
        k: {n: t.clone() for n, t in s.items()} for k, s in core.full_state()[1]["state"].items()
    }
    core.step(_samples())
    assert not torch.equal(core.model_state()["lm_head.weight"], expected_model["lm_head.weight"])
    assert model_sd.keys() == expected_model.keys()
    for key, value in model_sd.items():
        assert torch.equal(value, expected_model[key]), f"{key} changed under the snapshot"
    if not full:
        assert optim_sd is None
        return
    assert optim_sd is not None
    for key, state in optim_sd["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(expected_state[key][name])), (
                key,
                name,
            )
