"""A restart after a crash, and a ledger writer whose flush fails.

- The requests a crashed orchestrator sent just before it died (held unacked by its dead writer,
  or not yet read) are in the ledger before the next one restores: they count against the budget
  at once, instead of up to twice the budget going out and those groups being forgotten.
- A flush that fails (a refused event whose dead letter cannot be published, anything else) is
  retried: later events are still committed within the flush interval, not only at 4,000 rows
  or after `ack_wait`; and a writer that keeps failing ends the service with the error.
"""

import asyncio
import contextlib
import time
from pathlib import Path

import nats.errors
import pytest
from offbeat_orchestrator import ledger_writer, service
from offbeat_orchestrator.config import OrchestratorConfig
from offbeat_orchestrator.ledger_writer import LedgerWriter
from orch_helpers import CountingEnv, completion, request, scored, trajectory_rows
from sqlalchemy import text

from offbeat.config import LedgerConfig, RunConfig, RunSection
from offbeat.service import HealthServer, ServiceContext
from offbeat.testing import wait_for
from offbeat.v1 import rollout_pb2

pytestmark = pytest.mark.integration


def _context(bus, run_id, ledger_config, tmp_path: Path) -> ServiceContext[OrchestratorConfig]:
    """The orchestrator in-process on the test bus: a budget of 2 groups (G = 2, max_staleness 0)."""
    run = RunConfig(
        run=RunSection(
            id=run_id, state_dir=str(tmp_path / "state"), group_size=2, groups_per_step=2, max_staleness=0
        ),
        bus=bus.cfg,
        ledger=ledger_config,
    )
    cfg = OrchestratorConfig(admin_port=0, tick_s=0.05, status_refresh_s=0.1)
    details: dict = {}
    health = HealthServer("127.0.0.1", 0, lambda: details)
    return ServiceContext("orchestrator", run, cfg, bus, asyncio.Event(), health, details=details)


async def _crash_holding(bus, ledger, ledger_config, gid: str) -> None:
    """A writer that read the request for `gid` and was killed before its flush: no row, no ack."""
    slow = LedgerConfig(database_url=ledger_config.database_url, flush_interval_s=3600, batch_size=100_000)
    task = asyncio.create_task(LedgerWriter(bus, ledger, slow).run(asyncio.Event()))
    await bus.publish(bus.subjects.rollout_request, request(bus.run_id, gid, 2), msg_id=f"request:{gid}:0")

    async def held() -> bool:
        return (await bus.consumer_pending("ledger"))[1] >= 1

    await wait_for(held, timeout_s=30)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_restart_counts_the_groups_a_crashed_orchestrator_had_just_sent(
    bus, ledger, ledger_config, run_id, tmp_path, monkeypatch
):
    monkeypatch.setattr(service, "load_envs", lambda specs: [("count", 1.0, CountingEnv())])
    await _crash_holding(bus, ledger, ledger_config, "held")  # delivered to the dead writer
    await bus.publish(bus.subjects.rollout_request, request(run_id, "unread", 2), msg_id="request:unread:0")
    assert await trajectory_rows(ledger, run_id) == {}
    crashed_at = time.monotonic()

    ctx = _context(bus, run_id, ledger_config, tmp_path)
    task = asyncio.create_task(service.serve(ctx))
    try:
        await wait_for(lambda: ctx.health.healthy or task.done(), timeout_s=30)
        assert not task.done(), task.exception()
        await asyncio.sleep(1.0)  # 20 ticks: time enough to dispatch, were the budget free
        assert time.monotonic() - crashed_at < bus.cfg.ack_wait_s, "too slow to tell from a redelivery"
        groups = {row["group_id"] for row in (await trajectory_rows(ledger, run_id)).values()}
        assert groups == {"held", "unread"}, "the restored scheduler dispatched beyond its budget"
        assert ctx.details["groups_in_flight"] == 2
    finally:
        ctx.stop.set()
        await asyncio.wait_for(task, timeout=30)
        ctx.health.close()


async def test_a_fresh_run_does_not_wait_to_catch_up(bus, ledger, ledger_config):
    started = time.monotonic()
    assert await LedgerWriter(bus, ledger, ledger_config).catch_up()
    assert time.monotonic() - started < 0.2


async def test_a_dead_letter_that_fails_to_publish_once_is_sent_with_the_next_flush(
    bus, ledger, writer, run_id, monkeypatch
):
    s = bus.subjects
    publish, failed = bus.publish, []

    async def flaky(subject, message, *, msg_id):
        if subject == s.dlq and not failed:
            failed.append(msg_id)
            raise nats.errors.TimeoutError
        return await publish(subject, message, msg_id=msg_id)

    monkeypatch.setattr(bus, "publish", flaky)
    req = request(run_id, "g1", 2)
    bad = scored(completion(req, 0), 0.0, status=rollout_pb2.REWARD_STATUS_ERROR)
    bad.status_reason = "sandbox said \x00"  # PostgreSQL text refuses NUL
    started = time.monotonic()
    await publish(s.rollout_request, req, msg_id="request:g1:0")
    await publish(s.rollout_scored, bad, msg_id="scored:g1-0")

    async def letters() -> list:
        async with ledger.engine.connect() as conn:
            query = text("SELECT consumer, reason FROM dead_letters WHERE run_id=:r")
            return list(await conn.execute(query, {"r": run_id}))

    await wait_for(lambda: failed, timeout_s=30)
    after = request(run_id, "g2", 1)
    await publish(s.rollout_request, after, msg_id="request:g2:0")
    await wait_for(lambda: _rows_have(ledger, run_id, "g2-0"), timeout_s=2)
    await wait_for(letters, timeout_s=30)
    assert time.monotonic() - started < bus.cfg.ack_wait_s, "recorded only after a redelivery"
    [(consumer, reason)] = await letters()
    assert consumer == "ledger" and reason.startswith("ledger refused the event"), reason
    assert (await bus.consumer_pending("ledger"))[1] == 0, "the refused event was never acked"


async def test_a_dead_letter_too_large_to_publish_goes_without_its_payload(
    bus, ledger, writer, run_id, monkeypatch
):
    s = bus.subjects
    publish, refused = bus.publish, []

    async def too_large(subject, message, *, msg_id):
        if subject == s.dlq and message.payload:
            refused.append(msg_id)
            raise nats.errors.MaxPayloadError
        return await publish(subject, message, msg_id=msg_id)

    monkeypatch.setattr(bus, "publish", too_large)
    bad = scored(completion(request(run_id, "g1", 1), 0), 0.0, status=rollout_pb2.REWARD_STATUS_ERROR)
    bad.status_reason = "\x00"
    await publish(s.rollout_scored, bad, msg_id="scored:g1-0")

    async def reasons() -> list[str]:
        async with ledger.engine.connect() as conn:
            query = text("SELECT reason FROM dead_letters WHERE run_id=:r")
            return [r for (r,) in await conn.execute(query, {"r": run_id})]

    await wait_for(reasons, timeout_s=30)
    [reason] = await reasons()
    assert reason.endswith("(payload left out: the letter could not be published with it)"), reason
    assert len(refused) == ledger_writer.LETTER_ATTEMPTS - 1


async def _rows_have(ledger, run_id: str, tid: str) -> bool:
    return tid in await trajectory_rows(ledger, run_id)


async def test_a_failed_flush_is_retried_and_the_writer_goes_on(bus, ledger, writer, run_id, monkeypatch):
    commit, failures = writer._commit, []

    async def fails_once(batch, rows):
        if not failures:
            failures.append(len(batch))
            raise RuntimeError("lost the connection while acking")
        return await commit(batch, rows)

    monkeypatch.setattr(writer, "_commit", fails_once)
    started = time.monotonic()
    await bus.publish(bus.subjects.rollout_request, request(run_id, "g1", 2), msg_id="request:g1:0")
    await wait_for(lambda: failures, timeout_s=30)
    await bus.publish(bus.subjects.rollout_request, request(run_id, "g2", 2), msg_id="request:g2:0")
    await wait_for(lambda: _rows_have(ledger, run_id, "g2-1"), timeout_s=3)
    assert {"g1-0", "g1-1"} <= set(await trajectory_rows(ledger, run_id)), "the failed batch was dropped"
    await wait_for(lambda: writer.committed_events >= 2, timeout_s=3)
    assert time.monotonic() - started < bus.cfg.ack_wait_s, "committed only after a redelivery"


async def test_a_writer_that_cannot_commit_ends_the_service(
    bus, ledger, ledger_config, run_id, tmp_path, monkeypatch
):
    async def broken(self, batch, rows):
        raise RuntimeError("the ledger is wedged")

    monkeypatch.setattr(ledger_writer, "RETRY_BACKOFF_S", (0.01,))
    monkeypatch.setattr(LedgerWriter, "_commit", broken)
    monkeypatch.setattr(service, "load_envs", lambda specs: [("count", 1.0, CountingEnv())])
    ctx = _context(bus, run_id, ledger_config, tmp_path)
    task = asyncio.create_task(service.serve(ctx))
    try:
        await bus.publish(bus.subjects.rollout_request, request(run_id, "g1", 2), msg_id="request:g1:0")
        with pytest.raises(RuntimeError, match="wedged"):
            await asyncio.wait_for(task, timeout=30)
    finally:
        ctx.stop.set()
        ctx.health.close()
