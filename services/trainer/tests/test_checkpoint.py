"""Checkpoints are atomic directories; pruning keeps what rollback needs."""

from __future__ import annotations

from pathlib import Path

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
