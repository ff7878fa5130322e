"""Events no service would send, found by the fuzz suite (tests/test_fuzz.py).

- The ledger records only events of its own run: one that names no run (an empty `run_id`, which
  is what random bytes usually parse to) is dead-lettered, never written. A `trainer.step` with no
  run id and step 99999 had become the run's latest step, and `offbeat run` stopped as finished.
- A time field that is not a time (NaN, out of range) costs that field, not the event:
  `datetime.fromtimestamp` raised inside the ledger writer's handler.
- A reward status the enum does not define (proto3 enums are open) is `unknown:<n>`: naming it
  raised in the writer's handler and in the scheduler's observer, which then skipped the rest of
  the committed batch and held the budget until the requests timed out.
- An id the ledger cannot hold (a NUL, over 64 characters) in a step report is skipped: PostgreSQL
  refused the whole report, so the step and the trained state of its samples went missing.
"""

import math

import pytest
from offbeat_orchestrator.config import OrchestratorConfig
from offbeat_orchestrator.events import reward_status_name, to_rows
from offbeat_orchestrator.ledger_writer import Observed
from offbeat_orchestrator.scheduler import Scheduler
from orch_helpers import step
from sqlalchemy import text

from offbeat.config import RunSection
from offbeat.testing import wait_for
from offbeat.v1 import policy_pb2, rollout_pb2

pytestmark = pytest.mark.integration


async def test_an_event_that_names_no_run_is_dead_lettered_not_recorded(bus, ledger, writer, run_id):
    s = bus.subjects
    forged = [
        (s.trainer_step, policy_pb2.TrainerStep(step=99999, consumed_trajectory_ids=["x-0"])),
        (s.policy_weights, policy_pb2.WeightVersion(version=777, step=777, uri="file:///x")),
        (s.control("stop"), policy_pb2.ControlCommand(kind=policy_pb2.CONTROL_KIND_STOP)),
    ]
    for i, (subject, message) in enumerate(forged):
        await bus.publish(subject, message, msg_id=f"forged:{i}")

    async def letters():
        async with ledger.engine.connect() as conn:
            return list(
                await conn.execute(
                    text("SELECT subject, reason FROM dead_letters WHERE run_id=:r AND consumer='ledger'"),
                    {"r": run_id},
                )
            )

    async def all_dead() -> bool:
        return len(await letters()) == len(forged)

    await wait_for(all_dead, timeout_s=60)
    assert all("names run ''" in reason for _, reason in await letters()), await letters()
    assert await ledger.latest_step(run_id) == 0
    assert await ledger.list_policies(run_id) == []


@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e300, -1e20])
def test_a_time_that_is_not_a_time_costs_the_field_not_the_event(bad):
    run = "r1"
    letter = policy_pb2.DeadLetter(subject="offbeat.r1.x", reason="r", consumer="c", dead_at=bad)
    assert to_rows(run, "dlq", letter, key="k").dead_letters[0]["at"] is not None
    request = rollout_pb2.RolloutRequest(run_id=run, trajectory_ids=["a-0"], n=1, created_at=bad)
    assert to_rows(run, "rollout.request", request).trajectories[0]["requested_at"] is None
    step = policy_pb2.TrainerStep(run_id=run, step=1, started_at=bad, finished_at=bad)
    assert to_rows(run, "trainer.step", step).trainer_steps[0]["finished_at"] is None
    completion = rollout_pb2.RolloutCompletion(run_id=run, trajectory_id="a-0", finished_at=bad)
    scored = rollout_pb2.ScoredTrajectory(completion=completion, scored_at=bad)
    assert to_rows(run, "rollout.scored", scored).trajectories[0]["scored_at"] is None
    live = policy_pb2.PolicyLive(run_id=run, version=1, ok=True, live_at=bad)
    assert to_rows(run, "policy.live", live).live[1] is not None


def test_a_reward_status_the_enum_does_not_define_is_named_not_raised():
    assert reward_status_name(rollout_pb2.REWARD_STATUS_PARSE_ERROR) == "parse_error"
    assert reward_status_name(7) == "unknown:7"
    completion = rollout_pb2.RolloutCompletion(run_id="r1", trajectory_id="a-0")
    rows = to_rows("r1", "rollout.scored", rollout_pb2.ScoredTrajectory(completion=completion, status=7))
    assert rows.trajectories[0]["reward_status"] == "unknown:7"


async def test_one_event_the_scheduler_cannot_take_in_does_not_hide_the_rest(bus, run_id):
    sched = Scheduler(bus, RunSection(id=run_id), OrchestratorConfig(), [])
    odd = Observed("trainer.step", "x", rollout_pb2.RolloutRequest(), 0.0)  # no step field: raises
    sched.observe([odd, Observed("trainer.step", "x", step(run_id, 3, consumed=[]), 0.0)])
    assert sched.step == 3


async def test_a_step_report_naming_an_id_the_ledger_cannot_hold_is_recorded_without_it(
    bus, ledger, writer, run_id
):
    await bus.publish(
        bus.subjects.rollout_request,
        rollout_pb2.RolloutRequest(run_id=run_id, request_id="q", group_id="q", n=1, trajectory_ids=["q-0"]),
        msg_id="request:q:0",
    )
    report = policy_pb2.TrainerStep(
        run_id=run_id,
        step=1,
        consumed_trajectory_ids=["q-0", "x" * 65],
        dropped=[policy_pb2.DroppedTrajectory(trajectory_id="fz\x00-0", reason="group_finished")],
    )
    await bus.publish(bus.subjects.trainer_step, report, msg_id="step:1:q-0")

    async def trained() -> bool:
        fates = await ledger.trajectory_fates(run_id)
        return fates.get("trained") == 1

    await wait_for(trained, timeout_s=60)
    assert await ledger.latest_step(run_id) == 1
