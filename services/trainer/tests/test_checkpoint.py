"""Checkpoints are atomic directories; pruning keeps what rollback needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from offbeat_trainer.checkpoint import (
    JOURNAL,
    Checkpoints,
    TrainerState,
    VersionRecord,
    read_state,
    save_weights,
)


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


def test_the_accounting_is_journaled_once_and_every_checkpoint_reads_its_own(tmp_path: Path) -> None:
    ckpts = Checkpoints(tmp_path, keep=10)
    state = TrainerState()
    names, expected = [], []
    for step in range(1, 4):
        state.step = step
        state.consumed += [f"s{step}-{i}" for i in range(1000)]
        state.dropped[f"d{step}"] = "stale"
        names.append(_save(ckpts, state))
        expected.append(json.loads(state.to_json()))
    for name, want in zip(names, expected, strict=True):
        assert json.loads(read_state(tmp_path / name).to_json()) == want
        assert "s1-0" not in (tmp_path / name / "state.json").read_text()  # the ids are not rewritten
    assert len((tmp_path / JOURNAL).read_text().splitlines()) == 3  # each id once

    # a rollback to the first checkpoint: consumed cut back to its prefix, the undone ids retired
    old = read_state(tmp_path / names[0])
    state = TrainerState(step=1, consumed=old.consumed, dropped=state.dropped, retired=state.consumed[1000:])
    rolled = _save(ckpts, state)
    assert json.loads(read_state(tmp_path / rolled).to_json()) == json.loads(state.to_json())
    assert json.loads(read_state(tmp_path / names[2]).to_json()) == expected[2]  # still as it was


def test_a_journal_tail_that_no_checkpoint_recorded_is_cut_by_the_next_save(tmp_path: Path) -> None:
    ckpts = Checkpoints(tmp_path)
    state = TrainerState(step=1, consumed=["a", "b"])
    _save(ckpts, state)
    state.step, state.consumed = 2, [*state.consumed, "lost-with-the-crash"]
    ckpts._append(state)  # the journal entry is durable, then the process dies before the rename
    restarted = Checkpoints(tmp_path)
    resumed = read_state(tmp_path / (restarted.latest() or ""))
    assert resumed.consumed == ["a", "b"]
    resumed.step, resumed.consumed = 2, [*resumed.consumed, "c"]
    name = _save(restarted, resumed)
    assert read_state(tmp_path / name).consumed == ["a", "b", "c"]
    assert "lost-with-the-crash" not in (tmp_path / JOURNAL).read_text()


def test_a_checkpoint_from_before_the_journal_resumes_with_all_its_accounting(tmp_path: Path) -> None:
    legacy = TrainerState(step=1, consumed=["a"], dropped={"b": "stale"}, retired=["c"])
    name = _save(Checkpoints(tmp_path), legacy)
    (tmp_path / name / "state.json").write_text(legacy.to_json())  # the accounting in state.json
    (tmp_path / JOURNAL).unlink()
    assert read_state(tmp_path / name) == legacy
    ckpts = Checkpoints(tmp_path)
    legacy.step, legacy.consumed = 2, ["a", "d"]
    assert read_state(tmp_path / _save(ckpts, legacy)) == legacy


def test_a_damaged_journal_is_a_clear_error(tmp_path: Path) -> None:
    ckpts = Checkpoints(tmp_path)
    name = _save(ckpts, TrainerState(step=1, consumed=["a", "b"]))
    (tmp_path / JOURNAL).write_bytes((tmp_path / JOURNAL).read_bytes()[:-5])
    with pytest.raises(ValueError, match="does not hold what the checkpoint recorded"):
        read_state(tmp_path / name)
    with pytest.raises(ValueError, match="shorter than its newest checkpoint"):
        _save(ckpts, TrainerState(step=2, consumed=["a", "b", "c"]))


def test_a_version_recorded_with_sha256_chunk_digests_loads_without_them() -> None:
    record = VersionRecord(
        step=3, parent=2, uri="file:///w/v3.safetensors", sha256="ab" * 32, chunk_bytes=1 << 20
    )
    data = json.loads(TrainerState(step=3, versions={3: record}).to_json())
    del data["versions"]["3"]["chunk_blake3"]
    data["versions"]["3"]["chunk_sha256"] = ["cd" * 32]  # as a trainer wrote them before BLAKE3
    loaded = TrainerState.from_json(json.dumps(data)).versions[3]
    # re-announced, the version is verified by its sha256 alone, never by digests of another hash
    assert (loaded.chunk_bytes, loaded.chunk_blake3) == (0, [])
    assert (loaded.uri, loaded.sha256) == (record.uri, record.sha256)
