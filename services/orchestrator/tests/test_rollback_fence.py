"""Reports of the timeline a rollback undid, arriving after it: the trainer finishes the step it is
on before it acts on a rollback, so the scheduler and the ledger must not let them undo it."""

import time
from types import SimpleNamespace

import pytest
from offbeat_orchestrator.config import OrchestratorConfig
from offbeat_orchestrator.ledger_writer import Observed
from offbeat_orchestrator.scheduler import Scheduler
from orch_helpers import CountingEnv, live, step, weights

from offbeat.bus import Subjects
from offbeat.config import RunSection
from offbeat.ledger.store import RollbackResult


def _rolled_back_at_step_5(run_id: str = "r") -> Scheduler:
    """The reviewer's scenario: the trainer at step 5 (v0 at 0, v1 at 2, v2 at 4, v2 live) is
    rolled back to v1 (step 2) while it computes step 6 of 6."""
    bus = SimpleNamespace(run_id=run_id, subjects=Subjects("offbeat", run_id))
    run = RunSection(id=run_id, group_size=2, groups_per_step=1, max_staleness=1, max_steps=6)
    s = Scheduler(bus, run, OrchestratorConfig(), [("count", 1.0, CountingEnv())], start_step=5)  # type: ignore[arg-type]
    s.version_steps = {0: 0, 1: 2, 2: 4}
    s.live_version, s.live_step, s.newest_step = 2, 4, 4
    s.rolled_back(RollbackResult(version=1, step=2, versions=[2], trajectory_ids=[], steps=3))
    return s


def _see(s: Scheduler, kind: str, message) -> None:
    s.observe([Observed(kind, f"offbeat.r.{kind}", message, 0.0)])


def test_a_late_step_report_of_the_undone_timeline_moves_nothing():
    s = _rolled_back_at_step_5()
    assert (s.step, s.finished) == (2, False)
    _see(s, "trainer.step", step("r", 6, consumed=[]))
    assert (s.step, s.finished) == (2, False), "the undone step 6 ended the run"
    assert s.budget() > 0
    _see(s, "policy.weights", weights("r", 1, 2, 0))  # the re-announcement of the target
    _see(s, "trainer.step", step("r", 3, consumed=[]))
    assert (s.step, s.fence) == (3, None)


def test_a_late_version_and_its_live_report_are_rolled_back_and_ignored():
    s = _rolled_back_at_step_5()
    _see(s, "trainer.step", step("r", 6, consumed=[], version=3))
    _see(s, "policy.weights", weights("r", 3, 6, 2))
    _see(s, "policy.live", live("r", 3))
    assert 3 in s.rolled_back_versions
    assert (s.step, s.newest_step, s.live_version, s.live_step) == (2, 2, 1, 2)
    assert 3 not in s.version_steps
    _see(s, "policy.weights", weights("r", 1, 2, 0))
    _see(s, "policy.live", live("r", 3))  # a replica slow to switch, after the fence lifted
    _see(s, "policy.live", live("r", 1))
    assert (s.live_version, s.live_step) == (1, 2)
    _see(s, "policy.weights", weights("r", 4, 3, 1))  # the new timeline's first version
    _see(s, "trainer.step", step("r", 3, consumed=[], version=4))
    assert (s.step, s.newest_step, s.version_steps[4]) == (3, 3, 3)


def test_a_child_of_a_rolled_back_version_is_rolled_back_after_the_fence_too():
    s = _rolled_back_at_step_5()
    _see(s, "policy.weights", weights("r", 1, 2, 0))
    _see(s, "policy.weights", weights("r", 5, 5, 2))
    assert 5 in s.rolled_back_versions and 5 not in s.version_steps
    _see(s, "trainer.step", step("r", 6, consumed=[], version=5))
    assert s.step == 2


def test_a_late_report_still_retires_its_trajectories():
    s = _rolled_back_at_step_5()
    env, example = s.mixture.draw()
    req = s._new_request(env, example, eval_=False, now=time.time())
    _see(s, "trainer.step", step("r", 6, consumed=list(req.trajectory_ids)))
    assert req.group_id not in s.groups and s.step == 2


def test_a_rollback_the_trainer_never_answers_does_not_fence_for_good():
    s = _rolled_back_at_step_5()
    s._fenced_at -= s.cfg.request_timeout_s + 1
    _see(s, "trainer.step", step("r", 3, consumed=[]))
    assert (s.step, s.fence) == (3, None)


@pytest.mark.integration
async def test_a_late_step_report_of_a_rolled_back_version_stays_rolled_back(ledger, run_id):
    def version(v: int, at: int, parent: int) -> dict:
        return {"run_id": run_id, "version": v, "step": at, "parent": parent, "uri": "u", "sha256": "s"}

    def step_row(n: int, v: int = 0) -> dict:
        return {"run_id": run_id, "step": n, "version": v, "consumed": 1, "dropped": 0, "metrics": {}}

    await ledger.write_batch(
        run_id,
        policy_versions=[version(0, 0, -1), version(1, 2, 0), version(2, 4, 1)],
        trainer_steps=[step_row(n, {2: 1, 4: 2}.get(n, 0)) for n in range(1, 6)],
    )
    await ledger.rollback_to(run_id, 1)
    assert await ledger.latest_step(run_id) == 2
    await ledger.write_batch(run_id, trainer_steps=[step_row(6, 3)])  # before its announcement
    assert await ledger.latest_step(run_id) == 2
    await ledger.write_batch(run_id, policy_versions=[version(3, 6, 2)])
    await ledger.write_batch(run_id, trainer_steps=[step_row(6, 3)])  # replayed after it
    assert await ledger.latest_step(run_id) == 2
    await ledger.write_batch(run_id, trainer_steps=[step_row(7)])  # no version: above rolled-back ones
    assert await ledger.latest_step(run_id) == 2
    # the new timeline re-reports every step from 3, two in one batch
    await ledger.write_batch(run_id, policy_versions=[version(1, 2, 0)], trainer_steps=[step_row(3)])
    await ledger.write_batch(
        run_id, policy_versions=[version(4, 4, 1)], trainer_steps=[step_row(4, 4), step_row(5)]
    )
    assert await ledger.latest_step(run_id) == 5
    assert [s for s, _, _ in await ledger.step_metrics(run_id)] == [1, 2, 3, 4, 5]
    await ledger.upsert_trainer_steps([step_row(6, 3)])  # the single-table method keeps it too
    assert await ledger.latest_step(run_id) == 5
