"""Checkpoints are atomic directories; pruning keeps what rollback needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from offbeat_trainer.checkpoint import Checkpoints, TrainerState, VersionRecord, save_weights


def _save(ckpts: Checkpoints, state: TrainerState) -> str:
    w = save_weights({"w": torch.ones(2)}, ckpts.root / ".weights-t.safetensors")
    return ckpts.save(state, weights_file=w, optimizer={}, scheduler={})


def test_unfinished_checkpoint_is_ignored_and_cleaned(tmp_path: Path) -> None:
    ckpts = Checkpoints(tmp_path)
    name = _save(ckpts, TrainerState(step=1, versions={0: VersionRecord(step=0, parent=-1)}))
    (tmp_path / ".tmp-ckpt-00000001-99").mkdir()  # a crash while writing the next one
    assert ckpts.latest() == name
    state, model, _ = ckpts.load(name)
    assert state.step == 1 and torch.equal(model["w"], torch.ones(2))
    _save(ckpts, state)
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_prune_keeps_recent_and_rollback_window(tmp_path: Path) -> None:
    ckpts = Checkpoints(tmp_path, keep=2, rollback_window=2)
    state = TrainerState()
    for step in range(6):
        name = ckpts.next_name()
        if step % 2 == 0:  # a version every other step
            state.versions[step // 2] = VersionRecord(step=step, parent=step // 2 - 1, checkpoint=name)
        state.step = step
        _save(ckpts, state)
    # versions 1 (ckpt 2) and 2 (ckpt 4) are in the window; ckpts 4 and 5 are the newest
    assert ckpts.names() == ["ckpt-00000002", "ckpt-00000004", "ckpt-00000005"]
    assert TrainerState.from_json(state.to_json()) == state


def _light(ckpts: Checkpoints, state: TrainerState, scheduler: dict) -> str:  # type: ignore[type-arg]
    w = save_weights({"w": torch.full((2,), float(state.step))}, ckpts.root / ".weights-t.safetensors")
    return ckpts.save(state, weights_file=w, optimizer=None, scheduler=scheduler)


def test_a_light_checkpoint_takes_the_optimizer_from_the_newest_full_one(tmp_path: Path) -> None:
    ckpts = Checkpoints(tmp_path, keep=1, rollback_window=0)
    w = save_weights({"w": torch.zeros(2)}, tmp_path / ".weights-t.safetensors")
    full = ckpts.save(TrainerState(step=0), weights_file=w, optimizer={"moments": 0}, scheduler={"s": 0})
    light = [_light(ckpts, TrainerState(step=s), {"s": s}) for s in (1, 2)]
    assert not (tmp_path / light[-1] / "optimizer.pt").exists()
    # keep=1 keeps only the newest, and the full checkpoint it needs; the first light one goes
    assert ckpts.names() == [full, light[-1]]
    state, model, opt = ckpts.load(light[-1])
    assert state.step == 2 and torch.equal(model["w"], torch.full((2,), 2.0))
    assert opt == {"optimizer": {"moments": 0}, "scheduler": {"s": 2}}

    w = save_weights({"w": torch.ones(2)}, tmp_path / ".weights-t.safetensors")
    newer = ckpts.save(TrainerState(step=3), weights_file=w, optimizer={"moments": 3}, scheduler={"s": 3})
    assert ckpts.names() == [newer]  # the old full one is needed by nothing kept
    _light(ckpts, TrainerState(step=4), {"s": 4})
    assert ckpts.load(ckpts.latest() or "")[2]["optimizer"] == {"moments": 3}


def test_a_light_checkpoint_needs_a_full_one(tmp_path: Path) -> None:
    ckpts = Checkpoints(tmp_path)
    with pytest.raises(FileNotFoundError, match="no full checkpoint"):
        _light(ckpts, TrainerState(step=1), {})
    assert ckpts.names() == []
