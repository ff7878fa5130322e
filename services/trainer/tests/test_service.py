"""The service's intake, driven without a bus: which messages are held, buffered and refused."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from offbeat_trainer.checkpoint import TrainerState, VersionRecord
from offbeat_trainer.config import TrainerConfig
from offbeat_trainer.service import Trainer

from offbeat.bus import Reject
from offbeat.config import RunConfig, RunSection


class FakeDelivery:
    def __init__(self) -> None:
        self.deferred = False
        self.acked = False

    def defer(self) -> None:
        self.deferred = True


def _trainer(tmp_path: Path) -> Trainer:
    run = RunConfig(run=RunSection(id="r", state_dir=str(tmp_path)))
    ctx = SimpleNamespace(config=TrainerConfig(), run=run, bus=SimpleNamespace(js=None), stop=asyncio.Event())
    trainer = Trainer(ctx, resume=False)  # type: ignore[arg-type]
    trainer.state = TrainerState(versions={0: VersionRecord(step=0, parent=-1)})
    trainer.vocab_size = 256
    return trainer


async def test_a_malformed_duplicate_of_a_held_trajectory_is_refused_without_touching_it(
    tmp_path, make_scored
):  # type: ignore[no-untyped-def]
    # a second message with a held trajectory's id but bad log-probs once took the held one out of
    # its group: its group went on without it and its delivery was held and heartbeated forever
    trainer = _trainer(tmp_path)
    valid, first = make_scored("r", "t-0", "g", group_size=2, reward=1.0), FakeDelivery()
    await trainer.on_scored(valid, first)  # type: ignore[arg-type]
    assert first.deferred and trainer.held["t-0"] == [first] and "t-0" in trainer.buffer

    bad = make_scored("r", "t-0", "g", group_size=2, reward=1.0)
    bad.completion.logprobs[0] = float("nan")
    with pytest.raises(Reject, match="not a finite number"):
        await trainer.on_scored(bad, FakeDelivery())  # type: ignore[arg-type]
    assert "t-0" in trainer.buffer and not trainer.buffer.departed
    assert trainer.held["t-0"] == [first]

    await trainer.on_scored(make_scored("r", "t-1", "g", group_size=2, reward=0.0), FakeDelivery())  # type: ignore[arg-type]
    assert sorted(t.trajectory_id for t in _take(trainer).samples) == ["t-0", "t-1"]


async def test_a_malformed_trajectory_nobody_holds_leaves_its_group(tmp_path, make_scored):  # type: ignore[no-untyped-def]
    trainer = _trainer(tmp_path)
    bad = make_scored("r", "t-0", "g", group_size=2, reward=1.0)
    bad.completion.logprobs[0] = 0.5
    with pytest.raises(Reject, match="above 0"):
        await trainer.on_scored(bad, FakeDelivery())  # type: ignore[arg-type]
    assert trainer.buffer.departed == {"g": {"t-0"}} and not trainer.held


@pytest.mark.parametrize(("tid", "gid"), [("t\x00-0", "g"), ("t-0", "g" * 65)])
async def test_an_id_the_ledger_cannot_hold_is_refused_and_leaves_no_group(tmp_path, make_scored, tid, gid):  # type: ignore[no-untyped-def]
    # a step report naming it was refused by PostgreSQL whole: the step went missing from the ledger
    trainer = _trainer(tmp_path)
    with pytest.raises(Reject, match="is not an id"):
        await trainer.on_scored(make_scored("r", tid, gid, group_size=2, reward=1.0), FakeDelivery())  # type: ignore[arg-type]
    assert not trainer.buffer.departed and not trainer.held and tid not in trainer.buffer


def _take(trainer: Trainer):  # type: ignore[no-untyped-def]
    return trainer.buffer.take_step(
        step=0,
        version_steps={0: 0},
        max_staleness=0,
        groups_per_step=1,
        std_normalize=False,
        filter_zero_advantage=False,
    )


async def test_a_valid_trajectory_after_a_malformed_one_of_its_id_counts_once(tmp_path, make_scored):  # type: ignore[no-untyped-def]
    # the malformed copy departed t-0 and the valid one joined as well: 2 of 2 with only t-0, so the
    # group was trained without t-1, which then started a group that never completes
    trainer = _trainer(tmp_path)
    bad = make_scored("r", "t-0", "g", group_size=2, reward=1.0)
    bad.completion.logprobs[0] = float("nan")
    with pytest.raises(Reject, match="not a finite number"):
        await trainer.on_scored(bad, FakeDelivery())  # type: ignore[arg-type]
    valid = FakeDelivery()
    await trainer.on_scored(make_scored("r", "t-0", "g", group_size=2, reward=1.0), valid)  # type: ignore[arg-type]
    assert _take(trainer).samples == [], "one of two members arrived"
    assert valid.deferred and "t-0" in trainer.buffer and not trainer.buffer.departures()

    await trainer.on_scored(make_scored("r", "t-1", "g", group_size=2, reward=0.0), FakeDelivery())  # type: ignore[arg-type]
    batch = _take(trainer)
    assert sorted(t.trajectory_id for t in batch.samples) == ["t-0", "t-1"] and batch.dropped == []
    assert not trainer.buffer.groups and not trainer.pending_drops


async def test_a_valid_trajectory_after_its_group_went_on_without_its_malformed_copy_is_dropped(
    tmp_path, make_scored
):  # type: ignore[no-untyped-def]
    trainer = _trainer(tmp_path)
    await trainer.on_scored(make_scored("r", "t-1", "g", group_size=2, reward=0.0), FakeDelivery())  # type: ignore[arg-type]
    bad = make_scored("r", "t-0", "g", group_size=2, reward=1.0)
    bad.completion.logprobs[0] = float("nan")
    with pytest.raises(Reject):
        await trainer.on_scored(bad, FakeDelivery())  # type: ignore[arg-type]
    assert [t.trajectory_id for t in _take(trainer).samples] == ["t-1"]

    late = FakeDelivery()
    await trainer.on_scored(make_scored("r", "t-0", "g", group_size=2, reward=1.0), late)  # type: ignore[arg-type]
    assert late.deferred and trainer.held["t-0"] == [late], "acked with the next step's commit"
    assert [(d.trajectory_id, d.reason) for d in trainer.pending_drops] == [("t-0", "group_finished")]
    assert not trainer.buffer.groups and not trainer.buffer.departures()
