import uuid

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from offbeat.ledger import Ledger, TerminalStatusError, downgrade, upgrade

pytestmark = pytest.mark.integration


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
        names = {r[0] for r in rows}
    await engine.dispose()
    return names


async def test_upgrade_downgrade_upgrade(fresh_database_url):
    upgrade(fresh_database_url)
    assert {"runs", "policy_versions", "trajectories", "trainer_steps", "admin_actions"} <= await _tables(
        fresh_database_url
    )
    downgrade(fresh_database_url)
    assert await _tables(fresh_database_url) <= {"alembic_version"}
    upgrade(fresh_database_url)
    assert "trajectories" in await _tables(fresh_database_url)


def _rows(run_id: str, n: int, status: str) -> list[dict]:
    return [
        {
            "run_id": run_id,
            "trajectory_id": f"tr-{i}",
            "group_id": f"g-{i // 8}",
            "status": status,
            "env": "math",
        }
        for i in range(n)
    ]


async def test_ten_thousand_upserts_twice_leave_ten_thousand_rows(ledger: Ledger, run_id):
    rows = _rows(run_id, 10_000, "requested")
    assert await ledger.upsert_trajectories(rows) == 10_000
    await ledger.upsert_trajectories(rows)
    assert await ledger.count_trajectories(run_id) == 10_000
    assert await ledger.trajectory_fates(run_id) == {"requested": 10_000}


async def test_status_only_moves_forward_and_columns_merge(ledger: Ledger, run_id):
    await ledger.upsert_trajectories(
        [{"run_id": run_id, "trajectory_id": "a", "status": "scored", "reward": 1.0}]
    )
    await ledger.upsert_trajectories(
        [{"run_id": run_id, "trajectory_id": "a", "status": "generated", "completion_tokens": 7}]
    )
    await ledger.upsert_trajectories(
        [{"run_id": run_id, "trajectory_id": "a", "status": "trained", "staleness": 1}]
    )
    await ledger.upsert_trajectories([{"run_id": run_id, "trajectory_id": "a", "status": "discarded_stale"}])
    async with ledger.engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT status, reward, completion_tokens, staleness FROM trajectories WHERE run_id=:r AND trajectory_id='a'"
                ),
                {"r": run_id},
            )
        ).one()
    assert tuple(row) == ("trained", 1.0, 7, 1)


async def test_terminal_trajectory_refuses_status_change(ledger: Ledger, run_id, database_url):
    await ledger.upsert_trajectories(_rows(run_id, 1, "requested"))
    await ledger.transition(run_id, "tr-0", "trained")
    with pytest.raises(TerminalStatusError, match="trained"):
        await ledger.transition(run_id, "tr-0", "discarded_rolled_back", reason="rollback")
    await ledger.transition(run_id, "tr-0", "trained")  # same status again is idempotent
    dsn = database_url.replace("postgresql+asyncpg", "postgresql")
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.CheckViolation, match="terminal"):
        conn.execute(
            "UPDATE trajectories SET status='failed' WHERE run_id=%s AND trajectory_id='tr-0'", (run_id,)
        )


async def test_a_sample_failed_for_one_copy_and_trained_from_another_ends_trained(
    ledger: Ledger, run_id, database_url
):
    # a request re-issued after a timeout while its first copy was dead-lettered: the dead letter
    # marks the sample failed, then the trainer trains the copy; and the mirror order, a late
    # dead letter of a copy after the sample was trained, leaves it trained and unchanged
    dead = {"run_id": run_id, "status": "failed", "reason": "dead letter from inference: boom"}
    trained = {"run_id": run_id, "status": "trained", "consumed_step": 4, "staleness": 1}
    await ledger.upsert_trajectories([{**dead, "trajectory_id": "a"}, {**trained, "trajectory_id": "b"}])
    await ledger.upsert_trajectories([{**trained, "trajectory_id": "a"}, {**dead, "trajectory_id": "b"}])
    await ledger.upsert_trajectories([{**dead, "trajectory_id": "c"}, {**trained, "trajectory_id": "c"}])
    query = "SELECT trajectory_id, status, consumed_step, reason FROM trajectories WHERE run_id=:r"
    async with ledger.engine.connect() as conn:
        rows = {r[0]: tuple(r[1:]) for r in await conn.execute(text(query), {"r": run_id})}
    assert rows["a"] == ("trained", 4, dead["reason"]), "the failure's reason stays as the row's history"
    assert rows["b"] == ("trained", 4, None), "a late dead letter changed a trained row"
    assert rows["c"] == rows["a"], "one batch folds the events as two batches do"
    await ledger.upsert_trajectories(_rows(run_id, 1, "requested"))
    await ledger.transition(run_id, "tr-0", "failed", reason="timeout")
    await ledger.transition(run_id, "tr-0", "trained")
    with pytest.raises(TerminalStatusError, match="trained"):
        await ledger.transition(run_id, "tr-0", "failed")
    dsn = database_url.replace("postgresql+asyncpg", "postgresql")
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO trajectories (run_id, trajectory_id, status) VALUES (%s, 'e', 'failed')", (run_id,)
        )
        conn.execute(
            "UPDATE trajectories SET status='trained' WHERE run_id=%s AND trajectory_id='e'", (run_id,)
        )
        with pytest.raises(psycopg.errors.CheckViolation, match="terminal"):
            conn.execute(
                "UPDATE trajectories SET status='discarded_stale' WHERE run_id=%s AND trajectory_id='e'",
                (run_id,),
            )


async def test_staleness_histogram_and_audit(ledger: Ledger, run_id):
    rows = [
        {"run_id": run_id, "trajectory_id": str(uuid.uuid4()), "status": "trained", "staleness": s}
        for s in [0, 0, 1, 2, 2, 2]
    ]
    await ledger.upsert_trajectories(rows)
    assert await ledger.staleness_histogram(run_id) == {0: 2, 1: 1, 2: 3}
    await ledger.audit(run_id, "pause", args={"reason": "x"}, actor="test", ok=True, result="paused")


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_one_statement_batch_upsert_merges_every_column_type_on_either_driver(
    database_url, run_id, driver
):
    """A batch is ONE `INSERT ... SELECT FROM unnest(<column arrays>)`: every column type must
    travel as an array through both drivers, a batch may repeat a trajectory (merged first), and
    a terminal row keeps its status and values it already has."""
    from datetime import UTC, datetime

    led = Ledger.connect(database_url.replace("+asyncpg", f"+{driver}"))
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    try:
        await led.write_batch(
            run_id,
            trajectories=[
                {
                    "run_id": run_id,
                    "trajectory_id": "a",
                    "status": "requested",
                    "group_id": "g",
                    "eval": False,
                    "sample_index": 2,
                    "requested_at": at,
                },
                {
                    "run_id": run_id,
                    "trajectory_id": "a",
                    "status": "scored",
                    "reward": 0.5,
                    "reward_status": "ok",
                    "first_version": 3,
                    "last_version": 4,
                    "prompt_tokens": 7,
                    "scored_at": at,
                },
                {"run_id": run_id, "trajectory_id": "b", "status": "generated"},
            ],
        )
        await led.upsert_trajectories(
            [
                {
                    "run_id": run_id,
                    "trajectory_id": "a",
                    "status": "trained",
                    "advantage": -0.25,
                    "consumed_step": 9,
                    "staleness": 1,
                    "finished_at": at,
                },
                {"run_id": run_id, "trajectory_id": "b", "status": "failed", "reason": "dead letter"},
            ]
        )
        await led.upsert_trajectories(  # a replay of older events changes nothing
            [
                {
                    "run_id": run_id,
                    "trajectory_id": "a",
                    "status": "generated",
                    "reward": None,
                    "group_id": None,
                }
            ]
        )
        async with led.engine.connect() as conn:
            rows = {
                r[0]: tuple(r[1:])
                for r in await conn.execute(
                    text(
                        "SELECT trajectory_id, status, group_id, eval, sample_index, reward, reward_status,"
                        " first_version, last_version, prompt_tokens, advantage, consumed_step, staleness,"
                        " requested_at, scored_at, finished_at, reason FROM trajectories WHERE run_id=:r"
                    ),
                    {"r": run_id},
                )
            }
    finally:
        await led.close()
    assert rows["a"] == ("trained", "g", False, 2, 0.5, "ok", 3, 4, 7, -0.25, 9, 1, at, at, at, None)
    assert rows["b"][0] == "failed" and rows["b"][-1] == "dead letter"


async def test_an_id_too_long_is_refused_not_cut_short(ledger: Ledger, run_id):
    """Strings travel as text[]: the column's own length check must still refuse a long id (a cast
    to varchar(64)[] would silently truncate it and record a trajectory that does not exist)."""
    from sqlalchemy.exc import DBAPIError

    with pytest.raises(DBAPIError, match="too long"):
        await ledger.upsert_trajectories(
            [{"run_id": run_id, "trajectory_id": "x" * 80, "status": "requested"}]
        )
    assert await ledger.count_trajectories(run_id) == 0


async def test_a_rollback_chosen_as_a_deadlock_victim_runs_again(ledger: Ledger, run_id, monkeypatch):
    # the ledger writer's batches lock trainer_steps before trajectories, a rollback the other way
    # round: PostgreSQL aborts one of them, and the admin's Rollback must not fail for it
    from sqlalchemy.exc import DBAPIError

    from offbeat.ledger.store import RollbackResult

    class Deadlock(Exception):
        sqlstate = "40P01"

    calls = []

    async def once_a_victim(run: str, version: int, *, window: int) -> RollbackResult:
        calls.append(version)
        if len(calls) == 1:
            raise DBAPIError("UPDATE trainer_steps ...", {}, Deadlock("deadlock detected"))
        return RollbackResult(version=version, step=1, versions=[], trajectory_ids=[], steps=0)

    monkeypatch.setattr(ledger, "_rollback_to", once_a_victim)
    assert (await ledger.rollback_to(run_id, 1)).version == 1
    assert calls == [1, 1]

    class Other(Exception):
        sqlstate = "23505"

    async def refused(run: str, version: int, *, window: int) -> RollbackResult:
        raise DBAPIError("UPDATE ...", {}, Other("unique violation"))

    monkeypatch.setattr(ledger, "_rollback_to", refused)
    with pytest.raises(DBAPIError):
        await ledger.rollback_to(run_id, 1)
