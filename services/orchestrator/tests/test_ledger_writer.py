"""The ledger writer on real NATS + PostgreSQL: events as the services publish them become rows,
replays change nothing, malformed events are dead-lettered and recorded, a crash loses nothing."""

import asyncio
import contextlib

import pytest
from offbeat_orchestrator.ledger_writer import LedgerWriter
from orch_helpers import completion, live, request, scored, step, trajectory_rows, weights
from sqlalchemy import text

from offbeat.config import LedgerConfig
from offbeat.testing import wait_for
from offbeat.v1 import policy_pb2

pytestmark = pytest.mark.integration


def _run_events(bus, run_id):
    """One group of 3 trained/dropped samples and one eval sample, with versions and a step."""
    s = bus.subjects
    train = request(run_id, "g1", 3)
    evalr = request(run_id, "e1", 1, eval_=True)
    comps = [completion(train, 0), completion(train, 1, versions=(0, 1), tokens=6), completion(train, 2)]
    ecomp = completion(evalr, 0, versions=(1,))
    return [
        (s.policy_weights, weights(run_id, 0, 0, -1), "weights:0"),
        (s.policy_live, live(run_id, 0), "live:r0:0:1"),
        (s.rollout_request, train, "request:g1:0"),
        (s.rollout_request, evalr, "request:e1:0"),
        *[(s.rollout_completion, c, f"completion:{c.trajectory_id}") for c in comps],
        (s.rollout_completion, ecomp, "completion:e1-0"),
        *[
            (s.rollout_scored, scored(c, r), f"scored:{c.trajectory_id}")
            for c, r in zip(comps, (1.0, 0.0, 1.0), strict=True)
        ],
        (s.rollout_scored, scored(ecomp, 0.75), "scored:e1-0"),
        (s.policy_weights, weights(run_id, 1, 1, 0), "weights:1"),
        (
            s.trainer_step,
            step(run_id, 1, consumed=["g1-0", "g1-1"], dropped=[("g1-2", "stale")], version=1, staleness=1),
            "step:1:g1-0",
        ),
    ]


async def _snapshot(ledger, run_id):
    async with ledger.engine.connect() as conn:
        pv = [
            tuple(r)
            for r in await conn.execute(
                text(
                    "SELECT version, step, parent, status, eval_reward, eval_count, live_at IS NOT NULL FROM policy_versions WHERE run_id=:r ORDER BY version"
                ),
                {"r": run_id},
            )
        ]
        ts = [
            tuple(r)
            for r in await conn.execute(
                text(
                    "SELECT step, version, consumed, dropped, metrics FROM trainer_steps WHERE run_id=:r ORDER BY step"
                ),
                {"r": run_id},
            )
        ]
    return await trajectory_rows(ledger, run_id), pv, ts


async def test_events_become_rows_with_terminal_statuses_and_replay_changes_nothing(
    bus, ledger, writer, run_id
):
    events = _run_events(bus, run_id)
    for subject, message, msg_id in events:
        await bus.publish(subject, message, msg_id=msg_id)
    await wait_for(lambda: writer.committed_events >= len(events), timeout_s=60)

    rows, policies, steps = await _snapshot(ledger, run_id)
    assert {t: r["status"] for t, r in rows.items()} == {
        "g1-0": "trained",
        "g1-1": "trained",
        "g1-2": "discarded_stale",
        "e1-0": "evaluated",
    }
    a, b, c = rows["g1-0"], rows["g1-1"], rows["g1-2"]
    assert (a["consumed_step"], a["staleness"], a["advantage"], a["reward"]) == (1, 1, 0.25, 1.0)
    assert (b["first_version"], b["last_version"], b["completion_tokens"], b["prompt_tokens"]) == (0, 1, 6, 3)
    assert (a["group_id"], a["env"], a["prompt_key"], a["sample_index"], a["eval"]) == (
        "g1",
        "count",
        "k-g1",
        0,
        False,
    )
    assert a["requested_at"] and a["generated_at"] and a["scored_at"] and a["finished_at"]
    assert c["reason"] == "stale" and c["consumed_step"] is None and c["staleness"] == 6
    assert rows["e1-0"]["reward"] == 0.75 and rows["e1-0"]["reward_status"] == "ok"
    # eval reward is recorded on the oldest version that generated the eval sample (v1 here)
    assert policies == [(0, 0, -1, "active", None, 0, True), (1, 1, 0, "active", 0.75, 1, False)]
    assert steps == [(1, 1, 2, 1, {"loss": 0.5})]

    # a replay (e.g. redelivery after a crash): same payloads, fresh msg ids so NATS does not dedup
    before = writer.committed_events
    for subject, message, msg_id in events:
        await bus.publish(subject, message, msg_id=msg_id + ":replay")
    await wait_for(lambda: writer.committed_events >= before + len(events), timeout_s=60)
    assert await _snapshot(ledger, run_id) == (rows, policies, steps), "a replay changed the ledger"


async def test_malformed_event_is_dead_lettered_and_recorded(bus, ledger, writer, run_id):
    s = bus.subjects
    await bus.js.publish(s.rollout_completion, b"\xff\xff\xff\xff", headers={"Nats-Msg-Id": "garbage-1"})
    # another service dead-letters a request it could not handle: its samples end `failed`
    req = request(run_id, "g9", 2)
    await bus.publish(s.rollout_request, req, msg_id="request:g9:0")
    letter = policy_pb2.DeadLetter(
        subject=s.rollout_request,
        payload=req.SerializeToString(),
        reason="engine exploded",
        consumer="inference",
        deliveries=5,
        msg_id="request:g9:0",
        dead_at=1.0,
    )
    await bus.publish(s.dlq, letter, msg_id="dlq:inference:77")

    async def recorded():
        async with ledger.engine.connect() as conn:
            return {
                tuple(r)
                for r in await conn.execute(
                    text(
                        "SELECT consumer, subject, reason LIKE 'malformed%' FROM dead_letters WHERE run_id=:r"
                    ),
                    {"r": run_id},
                )
            }

    await wait_for(lambda: _has(recorded, 2), timeout_s=60)
    assert await recorded() == {
        ("ledger", s.rollout_completion, True),
        ("inference", s.rollout_request, False),
    }
    rows = await trajectory_rows(ledger, run_id)
    assert {t: (r["status"], r["reason"]) for t, r in rows.items()} == {
        f"g9-{i}": ("failed", "dead letter from inference: engine exploded") for i in range(2)
    }


async def _has(query, n):
    return len(await query()) >= n


async def test_a_crash_before_commit_loses_nothing(bus, ledger, ledger_config, run_id):
    """Acks wait for the commit: a writer killed with a full buffer leaves the events unacked,
    and the next writer records them."""
    slow = LedgerConfig(database_url=ledger_config.database_url, flush_interval_s=3600, batch_size=100_000)
    first = LedgerWriter(bus, ledger, slow)
    task = asyncio.create_task(first.run(asyncio.Event()))
    req = request(run_id, "gc", 4)
    await bus.publish(bus.subjects.rollout_request, req, msg_id="request:gc:0")

    async def held():
        return (await bus.consumer_pending("ledger"))[1] >= 1

    await wait_for(held, timeout_s=30)
    task.cancel()  # the crash: no flush, no ack
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await trajectory_rows(ledger, run_id) == {}

    second = LedgerWriter(bus, ledger, ledger_config)
    stop = asyncio.Event()
    task = asyncio.create_task(second.run(stop))
    try:  # redelivered after the consumer's ack_wait (5 s in the test bus config)
        await wait_for(lambda: second.committed_events >= 1, timeout_s=60)
        assert {r["status"] for r in (await trajectory_rows(ledger, run_id)).values()} == {"requested"}
        assert len(await trajectory_rows(ledger, run_id)) == 4
    finally:
        stop.set()
        await task


async def test_an_event_the_database_refuses_is_dead_lettered_and_the_rest_recorded(
    bus, ledger, writer, run_id
):
    s = bus.subjects
    bad = request(run_id, "x" * 80, 1)  # ids longer than the ledger's columns
    good = request(run_id, "ok", 2)
    await bus.publish(s.rollout_request, bad, msg_id="request:bad:0")
    await bus.publish(s.rollout_request, good, msg_id="request:ok:0")

    async def letters():
        async with ledger.engine.connect() as conn:
            return [
                tuple(r)
                for r in await conn.execute(
                    text("SELECT consumer, reason FROM dead_letters WHERE run_id=:r"), {"r": run_id}
                )
            ]

    await wait_for(lambda: _has(letters, 1), timeout_s=60)
    [(consumer, reason)] = await letters()
    assert consumer == "ledger" and reason.startswith("ledger refused the event"), reason
    await wait_for(lambda: writer.committed_events >= 2, timeout_s=60)
    assert sorted(await trajectory_rows(ledger, run_id)) == ["ok-0", "ok-1"]
