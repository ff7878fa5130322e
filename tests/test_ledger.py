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


async def test_staleness_histogram_and_audit(ledger: Ledger, run_id):
    rows = [
        {"run_id": run_id, "trajectory_id": str(uuid.uuid4()), "status": "trained", "staleness": s}
        for s in [0, 0, 1, 2, 2, 2]
    ]
    await ledger.upsert_trajectories(rows)
    assert await ledger.staleness_histogram(run_id) == {0: 2, 1: 1, 2: 3}
    await ledger.audit(run_id, "pause", args={"reason": "x"}, actor="test", ok=True, result="paused")
