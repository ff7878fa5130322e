"""The ledger records only events of its own run: one that names no run (an empty `run_id`, which
is what random bytes usually parse to) is dead-lettered, never written. Found by the fuzz suite:
a `trainer.step` with no run id and step 99999 became the run's latest step, and `offbeat run`
stopped as if the run had finished."""

import pytest
from sqlalchemy import text

from offbeat.testing import wait_for
from offbeat.v1 import policy_pb2

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
