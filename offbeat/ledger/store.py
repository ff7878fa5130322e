"""The ledger's async store: batched idempotent upserts and the questions asked of it.

Trajectory rows are merged, never overwritten: a column keeps its value unless the new event
brings one, and the status only moves forward (requested < generated < scored < terminal). Once
terminal, a status never changes: a batch skips such rows (so replays are harmless) and
`transition()` raises `TerminalStatusError`; a database trigger refuses it for any other writer.
A terminal row only fills columns it lacks (events of other subjects arrive in any order), never
its `reason` or `finished_at`. The one exception is `failed -> trained` (`REVIVED`): a re-issued
copy of a sample whose first copy was dead-lettered was trained after all; the row keeps the
failure's reason as its history.

A batch of trajectory rows is upserted by ONE statement over column arrays
(`INSERT ... SELECT * FROM unnest(:run_id, ...) ON CONFLICT ...`): one round trip and one
statement, where an executemany runs (and SQLAlchemy prepares parameters for) a statement per row.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import String, Table, TextClause, func, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from offbeat.ledger.models import (
    REVIVED,
    STATUS_RANK,
    TERMINAL,
    AdminAction,
    DeadLetterRow,
    PolicyVersion,
    Run,
    TrainerStep,
    Trajectory,
)

TRAJECTORIES: Table = Trajectory.__table__  # type: ignore[assignment]
log = logging.getLogger("offbeat.ledger")
RETRIED_SQLSTATES = ("40P01", "40001")
"""Deadlock detected, serialization failure: the transaction was a victim and can run again."""
ROLLBACK_ATTEMPTS = 3
TRAJECTORY_COLUMNS = tuple(c.name for c in TRAJECTORIES.columns)
KEY = ("run_id", "trajectory_id")
FIXED_WHEN_TERMINAL = ("reason", "finished_at")
"""Set by the transition to a terminal status; nothing later replaces them."""


class TerminalStatusError(ValueError):
    """A trajectory in a terminal status was asked to change status."""


class UnknownTrajectoryError(KeyError):
    """No such trajectory in the ledger."""


class UnknownVersionError(KeyError):
    """No such policy version in the ledger."""


class RolledBackVersionError(ValueError):
    """The policy version was rolled back and cannot be a rollback target."""


class PrunedVersionError(ValueError):
    """The policy version is older than the trainer's rollback window: its checkpoint is gone."""


@dataclass(frozen=True)
class RollbackResult:
    version: int
    step: int
    versions: list[int]
    """Versions newly marked rolled back."""
    trajectory_ids: list[str]
    """Unfinished trajectories of those versions, now `discarded_rolled_back`."""
    steps: int
    """Trainer steps newly marked rolled back."""


def ts(unix: float | None) -> datetime | None:
    return None if not unix else datetime.fromtimestamp(unix, tz=UTC)


def merge_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold rows with the same key the way the upsert would, so one batch touches a row once."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["run_id"], row["trajectory_id"])
        have = merged.get(key)
        if have is None:
            merged[key] = dict(row)  # columns it lacks are NULL in the upsert (`_columns`)
            continue
        old_status, new = have["status"], row.get("status")
        revived = (old_status, new) == REVIVED
        fixed = old_status in TERMINAL and not revived
        for c, v in row.items():
            if (
                v is None
                or c == "status"
                or (fixed and (c in FIXED_WHEN_TERMINAL or have.get(c) is not None))
            ):
                continue
            have[c] = v
        if new and (revived or (old_status not in TERMINAL and STATUS_RANK[new] > STATUS_RANK[old_status])):
            have["status"] = new
    return list(merged.values())


class Ledger:
    """Async access to the ledger database (asyncpg or psycopg through SQLAlchemy 2)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._upsert = _trajectory_upsert()

    @classmethod
    def connect(cls, url: str, *, pool_size: int = 5) -> Ledger:
        return cls(create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True))

    async def close(self) -> None:
        await self.engine.dispose()

    async def upsert_trajectories(self, rows: Sequence[dict[str, Any]], *, batch_size: int = 1000) -> int:
        """Merge trajectory events into rows; idempotent. Returns the number of distinct rows touched."""
        merged = merge_rows(rows)
        async with self.engine.begin() as conn:
            for i in range(0, len(merged), batch_size):
                await conn.execute(self._upsert, _columns(merged[i : i + batch_size]))
        return len(merged)

    async def transition(
        self, run_id: str, trajectory_id: str, status: str, *, reason: str | None = None
    ) -> None:
        """Move one trajectory to `status`; a terminal trajectory refuses any other status."""
        async with self.engine.begin() as conn:
            current = (
                await conn.execute(
                    select(TRAJECTORIES.c.status)
                    .where(TRAJECTORIES.c.run_id == run_id, TRAJECTORIES.c.trajectory_id == trajectory_id)
                    .with_for_update()
                )
            ).scalar_one_or_none()
            if current is None:
                raise UnknownTrajectoryError(trajectory_id)
            if current == status:
                return
            if current in TERMINAL and (current, status) != REVIVED:
                raise TerminalStatusError(
                    f"trajectory {trajectory_id} is {current}; refusing change to {status}"
                )
            values: dict[str, Any] = {"status": status, "reason": reason}
            if status in TERMINAL:
                values["finished_at"] = datetime.now(UTC)
            await conn.execute(
                update(TRAJECTORIES)
                .where(TRAJECTORIES.c.run_id == run_id, TRAJECTORIES.c.trajectory_id == trajectory_id)
                .values(**values)
            )

    async def upsert_run(self, run_id: str, *, config: dict[str, Any], status: str = "running") -> None:
        stmt = insert(Run).values(id=run_id, config=config, status=status)
        stmt = stmt.on_conflict_do_update(
            index_elements=["id"],
            set_={"config": stmt.excluded.config, "status": stmt.excluded.status, "updated_at": func.now()},
        )
        async with self.engine.begin() as conn:
            await conn.execute(stmt)

    async def upsert_policy_versions(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        stmt = insert(PolicyVersion)
        sets = {
            c: func.coalesce(getattr(stmt.excluded, c), getattr(PolicyVersion.__table__.c, c))
            for c in ("step", "parent", "uri", "sha256", "live_at", "eval_reward", "eval_count")
        }
        async with self.engine.begin() as conn:
            await conn.execute(
                stmt.on_conflict_do_update(index_elements=["run_id", "version"], set_=sets),
                [_fill(r, PolicyVersion, defaults={"eval_count": 0, "status": "active"}) for r in rows],
            )

    async def upsert_trainer_steps(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        stmt = insert(TrainerStep)
        cols = ("version", "consumed", "dropped", "metrics", "started_at", "finished_at")
        sets: dict[str, Any] = {c: getattr(stmt.excluded, c) for c in cols}
        sets["rolled_back"] = False
        async with self.engine.begin() as conn:
            await conn.execute(
                stmt.on_conflict_do_update(index_elements=["run_id", "step"], set_=sets),
                [_fill(r, TrainerStep, defaults={"rolled_back": False}) for r in rows],
            )
            for run_id in sorted({r["run_id"] for r in rows}):
                await _roll_back_undone_steps(conn, run_id, [int(r["step"]) for r in rows])

    async def add_dead_letters(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(DeadLetterRow).on_conflict_do_nothing(), [_fill(r, DeadLetterRow) for r in rows]
            )

    async def audit(
        self, run_id: str, action: str, *, args: dict[str, Any], actor: str, ok: bool, result: str
    ) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(AdminAction).values(
                    run_id=run_id, action=action, args=args, actor=actor, ok=ok, result=result
                )
            )

    # --- questions -----------------------------------------------------------------------------

    async def trajectory_fates(self, run_id: str) -> dict[str, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(TRAJECTORIES.c.status, func.count())
                .where(TRAJECTORIES.c.run_id == run_id)
                .group_by(TRAJECTORIES.c.status)
            )
            return {status: int(n) for status, n in rows}

    async def not_trained_reasons(self, run_id: str, *, limit: int = 10) -> list[tuple[str, str, int]]:
        """(status, reason, count) of the samples that ended neither trained nor evaluated
        (discarded stale or rolled back, failed), the most common reason first."""
        t = TRAJECTORIES.c
        ended = [s for s in TERMINAL if s not in ("trained", "evaluated")]
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(t.status, t.reason, func.count().label("n"))
                .where(t.run_id == run_id, t.status.in_(ended))
                .group_by(t.status, t.reason)
                .order_by(func.count().desc(), t.status, t.reason)
                .limit(limit)
            )
            return [(status, reason or "", int(n)) for status, reason, n in rows]

    async def staleness_histogram(self, run_id: str, *, status: str = "trained") -> dict[int, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(TRAJECTORIES.c.staleness, func.count())
                .where(
                    TRAJECTORIES.c.run_id == run_id,
                    TRAJECTORIES.c.status == status,
                    TRAJECTORIES.c.staleness.is_not(None),
                )
                .group_by(TRAJECTORIES.c.staleness)
                .order_by(TRAJECTORIES.c.staleness)
            )
            return {int(s): int(n) for s, n in rows}

    async def count_trajectories(self, run_id: str) -> int:
        async with self.engine.connect() as conn:
            return int(
                (
                    await conn.execute(
                        select(func.count()).select_from(TRAJECTORIES).where(TRAJECTORIES.c.run_id == run_id)
                    )
                ).scalar_one()
            )

    # --- the orchestrator's batched writer and admin API (one transaction per call) -------------

    async def write_batch(
        self,
        run_id: str,
        *,
        trajectories: Sequence[dict[str, Any]] = (),
        policy_versions: Sequence[dict[str, Any]] = (),
        live: dict[int, datetime] | None = None,
        trainer_steps: Sequence[dict[str, Any]] = (),
        dead_letters: Sequence[dict[str, Any]] = (),
        eval_versions: Iterable[int] = (),
        batch_size: int = 1000,
    ) -> None:
        """Everything one ledger-writer batch holds, in ONE transaction, idempotently.

        Same semantics as the single-table methods (trajectory rows merge and only move forward;
        policy versions and trainer steps upsert; dead letters are kept once). `live` sets a
        version's `live_at` once (the earliest report wins). The eval reward of every version in
        `eval_versions` (and of versions in this batch) is recomputed from its `evaluated`
        trajectories (mean over their oldest generating version), so replays never double count.
        """
        versions = _last_by(policy_versions, ("run_id", "version"))
        steps = _last_by(trainer_steps, ("run_id", "step"))
        letters = _last_by(dead_letters, ("run_id", "key"))
        merged = merge_rows(trajectories)
        pv = PolicyVersion.__table__.c  # type: ignore[attr-defined]
        async with self.engine.begin() as conn:
            if versions:
                await conn.execute(
                    _policy_version_upsert(),
                    [
                        _fill(r, PolicyVersion, defaults={"eval_count": 0, "status": "active"})
                        for r in versions
                    ],
                )
                await _inherit_rollbacks(conn, run_id)
            for version, at in sorted((live or {}).items()):
                await conn.execute(
                    update(PolicyVersion)
                    .where(pv.run_id == run_id, pv.version == version)
                    .values(live_at=func.least(func.coalesce(pv.live_at, at), at))
                )
            if steps:
                await conn.execute(
                    _trainer_step_upsert(),
                    [_fill(r, TrainerStep, defaults={"rolled_back": False}) for r in steps],
                )
            if steps or versions:
                await _roll_back_undone_steps(conn, run_id, [int(r["step"]) for r in steps])
            for i in range(0, len(merged), batch_size):
                await conn.execute(self._upsert, _columns(merged[i : i + batch_size]))
            if letters:
                await conn.execute(
                    insert(DeadLetterRow).on_conflict_do_nothing(), [_fill(r, DeadLetterRow) for r in letters]
                )
            recompute = sorted(set(eval_versions) | {int(r["version"]) for r in versions})
            if recompute:
                await conn.execute(
                    text(
                        "UPDATE policy_versions p SET eval_reward = s.mean, eval_count = s.n FROM ("
                        " SELECT first_version AS v, avg(reward) AS mean, count(*) AS n FROM trajectories"
                        " WHERE run_id = :run AND status = 'evaluated' AND reward IS NOT NULL"
                        " AND first_version = ANY(:versions) GROUP BY first_version) s"
                        " WHERE p.run_id = :run AND p.version = s.v"
                    ),
                    {"run": run_id, "versions": recompute},
                )

    async def rollback_to(self, run_id: str, version: int, *, window: int = 0) -> RollbackResult:
        """Mark versions after `version` rolled back, their unfinished trajectories
        `discarded_rolled_back`, and trainer steps after its step rolled back; one transaction.

        Raises `UnknownVersionError` when there is no such version, `RolledBackVersionError`
        when it was itself rolled back, and `PrunedVersionError` when `window` (the trainer's
        `rollback_window`; 0: unlimited) or more active versions are newer, so the trainer no
        longer keeps its checkpoint. "After" means a higher id that is still active.

        The ledger writer's batches lock the same tables in another order, so PostgreSQL may
        abort this transaction as a deadlock's victim: it is then run again (a few times).
        """
        for attempt in itertools.count(1):
            try:
                return await self._rollback_to(run_id, version, window=window)
            except DBAPIError as exc:
                state = str(getattr(exc.orig, "sqlstate", "") or "")
                if state not in RETRIED_SQLSTATES or attempt >= ROLLBACK_ATTEMPTS:
                    raise
                log.warning("rollback to %d: %s (attempt %d); running it again", version, state, attempt)
                await asyncio.sleep(0.05 * attempt)
        raise AssertionError("unreachable")

    async def _rollback_to(self, run_id: str, version: int, *, window: int) -> RollbackResult:
        pv = PolicyVersion.__table__.c  # type: ignore[attr-defined]
        ts_ = TrainerStep.__table__.c  # type: ignore[attr-defined]
        t = TRAJECTORIES.c
        now = datetime.now(UTC)
        async with self.engine.begin() as conn:
            target = (
                await conn.execute(
                    select(pv.step, pv.status)
                    .where(pv.run_id == run_id, pv.version == version)
                    .with_for_update()
                )
            ).one_or_none()
            if target is None:
                raise UnknownVersionError(f"run {run_id} has no policy version {version}")
            step, status = int(target[0]), target[1]
            if status == "rolled_back":
                raise RolledBackVersionError(
                    f"policy version {version} was rolled back; it cannot be a target"
                )
            if window:
                newer = (
                    await conn.execute(
                        select(func.count()).where(
                            pv.run_id == run_id, pv.version > version, pv.status != "rolled_back"
                        )
                    )
                ).scalar_one()
                if newer >= window:
                    raise PrunedVersionError(
                        f"policy version {version} has {newer} newer versions; the trainer keeps "
                        f"checkpoints for the newest {window} only (trainer.rollback_window)"
                    )
            later = [
                int(v)
                for (v,) in await conn.execute(
                    update(PolicyVersion)
                    .where(pv.run_id == run_id, pv.version > version, pv.status != "rolled_back")
                    .values(status="rolled_back")
                    .returning(pv.version)
                )
            ]
            discarded: list[str] = []
            if later:
                discarded = [
                    tid
                    for (tid,) in await conn.execute(
                        update(TRAJECTORIES)
                        .where(
                            t.run_id == run_id,
                            t.status.in_(("requested", "generated", "scored")),
                            (t.first_version.in_(later)) | (t.last_version.in_(later)),
                        )
                        .values(
                            status="discarded_rolled_back",
                            reason=f"generated by a version rolled back to {version}",
                            finished_at=now,
                        )
                        .returning(t.trajectory_id)
                    )
                ]
            steps = (
                await conn.execute(
                    update(TrainerStep)
                    .where(ts_.run_id == run_id, ts_.step > step, ts_.rolled_back.is_(False))
                    .values(rolled_back=True)
                )
            ).rowcount
        return RollbackResult(
            version=version,
            step=step,
            versions=sorted(later),
            trajectory_ids=discarded,
            steps=int(steps or 0),
        )

    async def list_policies(self, run_id: str) -> list[dict[str, Any]]:
        pv = PolicyVersion.__table__.c  # type: ignore[attr-defined]
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(PolicyVersion.__table__).where(pv.run_id == run_id).order_by(pv.version)
            )
            return [dict(r._mapping) for r in rows]

    async def list_trajectories(
        self, run_id: str, *, status: str | None = None, after: str = "", limit: int = 100
    ) -> list[dict[str, Any]]:
        """Trajectories ordered by id, from the one after `after` (keyset paging)."""
        t = TRAJECTORIES.c
        query = select(TRAJECTORIES).where(t.run_id == run_id, t.trajectory_id > after)
        if status:
            query = query.where(t.status == status)
        async with self.engine.connect() as conn:
            rows = await conn.execute(query.order_by(t.trajectory_id).limit(limit))
            return [dict(r._mapping) for r in rows]

    async def sent_groups(self, run_id: str) -> list[tuple[str, str, str, bool]]:
        """(group id, env, prompt key, eval) of every group the run's requests recorded."""
        t = TRAJECTORIES.c
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(t.group_id, func.max(t.env), func.max(t.prompt_key), func.bool_or(t.eval))
                .where(t.run_id == run_id, t.group_id.is_not(None))
                .group_by(t.group_id)
            )
            return [(gid, env or "", key or "", bool(ev)) for gid, env, key, ev in rows]

    async def unfinished_groups(self, run_id: str) -> list[dict[str, Any]]:
        """Every trajectory of each group that still has one in flight (requested, generated or
        scored), ordered by group and sample index: what a restarted orchestrator still waits for."""
        t = TRAJECTORIES.c
        open_groups = (
            select(t.group_id)
            .where(t.run_id == run_id, t.status.in_(("requested", "generated", "scored")))
            .distinct()
        )
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(TRAJECTORIES)
                .where(t.run_id == run_id, t.group_id.in_(open_groups))
                .order_by(t.group_id, t.sample_index, t.trajectory_id)
            )
            return [dict(r._mapping) for r in rows]

    async def latest_step(self, run_id: str) -> int:
        """The highest trainer step that is not rolled back (0 before the first)."""
        c = TrainerStep.__table__.c  # type: ignore[attr-defined]
        async with self.engine.connect() as conn:
            value = (
                await conn.execute(
                    select(func.max(c.step)).where(c.run_id == run_id, c.rolled_back.is_(False))
                )
            ).scalar_one()
            return int(value or 0)

    async def step_metrics(self, run_id: str) -> list[tuple[int, int, dict[str, Any]]]:
        """(step, version, metrics) of every trainer step that is not rolled back, in order."""
        c = TrainerStep.__table__.c  # type: ignore[attr-defined]
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(c.step, c.version, c.metrics)
                .where(c.run_id == run_id, c.rolled_back.is_(False))
                .order_by(c.step)
            )
            return [(int(s), int(v), dict(m or {})) for s, v, m in rows]

    async def eval_rewards(self, run_id: str) -> list[tuple[int, int, float]]:
        """(version, step, eval reward) of the active versions that have one, in step order."""
        pv = PolicyVersion.__table__.c  # type: ignore[attr-defined]
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(pv.version, pv.step, pv.eval_reward)
                .where(pv.run_id == run_id, pv.eval_reward.is_not(None), pv.status == "active")
                .order_by(pv.step, pv.version)
            )
            return [(int(v), int(s), float(e)) for v, s, e in rows]

    async def forget_run(self, run_id: str) -> None:
        """Delete everything the ledger holds about a run (`offbeat run --fresh`)."""
        async with self.engine.begin() as conn:
            for model in (Trajectory, TrainerStep, PolicyVersion, DeadLetterRow, AdminAction):
                table = model.__table__
                await conn.execute(table.delete().where(table.c.run_id == run_id))  # type: ignore[attr-defined]
            await conn.execute(Run.__table__.delete().where(Run.__table__.c.id == run_id))  # type: ignore[attr-defined]

    async def set_run_status(self, run_id: str, status: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(Run).where(Run.id == run_id).values(status=status, updated_at=func.now())
            )

    async def admin_actions(self, run_id: str) -> list[dict[str, Any]]:
        c = AdminAction.__table__.c  # type: ignore[attr-defined]
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(AdminAction.__table__).where(c.run_id == run_id).order_by(c.id))
            return [dict(r._mapping) for r in rows]

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))


def _fill(row: dict[str, Any], model: type, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every column present (None where absent), so a multi-row statement has one shape."""
    cols = [c.name for c in model.__table__.columns if not (c.autoincrement is True and c.primary_key)]  # type: ignore[attr-defined]
    out = {c: row.get(c) for c in cols if c in row or c not in ("created_at", "at")}
    for k, v in (defaults or {}).items():
        if out.get(k) is None:
            out[k] = v
    return out


def _last_by(rows: Sequence[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per key, later rows' non-None values winning (a multi-row upsert may touch a key once)."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        k = tuple(row[c] for c in key)
        have = out.setdefault(k, {})
        have.update({c: v for c, v in row.items() if v is not None or c not in have})
    return list(out.values())


def _trajectory_upsert() -> TextClause:
    """Upsert trajectory rows given as one array per column (`_columns`). A row that exists keeps
    a column unless the new row brings a value (a terminal row: unless it has none); its status
    moves only forward and never leaves a terminal one but by `REVIVED`. Strings travel as text[]
    so that the insert itself checks their length (a cast to varchar(n)[] would cut them short
    silently)."""
    columns = list(TRAJECTORIES.columns)

    def array_type(c: Any) -> str:
        base = "TEXT" if isinstance(c.type, String) else c.type.compile(dialect=postgresql.dialect())
        return f"{base}[]"

    names = ", ".join(c.name for c in columns)
    arrays = ", ".join(f"CAST(:{c.name} AS {array_type(c)})" for c in columns)
    rank = "offbeat_status_rank"
    revived = f"(trajectories.status = '{REVIVED[0]}' AND excluded.status = '{REVIVED[1]}')"
    fixed = f"({rank}(trajectories.status) >= {STATUS_RANK['trained']} AND NOT {revived})"
    sets = [
        f"status = CASE WHEN {revived} THEN excluded.status WHEN {fixed} THEN trajectories.status"
        f" WHEN {rank}(excluded.status) > {rank}(trajectories.status) THEN excluded.status"
        " ELSE trajectories.status END"
    ]
    for c in columns:
        if c.name in KEY or c.name == "status":
            continue
        kept = f"trajectories.{c.name}"
        if c.name not in FIXED_WHEN_TERMINAL:
            kept = f"COALESCE(trajectories.{c.name}, excluded.{c.name})"
        sets.append(
            f"{c.name} = CASE WHEN {fixed} THEN {kept}"
            f" ELSE COALESCE(excluded.{c.name}, trajectories.{c.name}) END"
        )
    return text(
        f"INSERT INTO trajectories ({names}) SELECT * FROM unnest({arrays})"
        f" ON CONFLICT ({', '.join(KEY)}) DO UPDATE SET {', '.join(sets)}"
    )


def _columns(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Merged trajectory rows as one list per column (None where a row has no value)."""
    return {c: [row.get(c) for row in rows] for c in TRAJECTORY_COLUMNS}


def _policy_version_upsert() -> Any:
    stmt = insert(PolicyVersion)
    sets = {
        c: func.coalesce(getattr(stmt.excluded, c), getattr(PolicyVersion.__table__.c, c))  # type: ignore[attr-defined]
        for c in ("step", "parent", "uri", "sha256", "live_at", "eval_reward", "eval_count")
    }
    return stmt.on_conflict_do_update(index_elements=["run_id", "version"], set_=sets)


def _trainer_step_upsert() -> Any:
    stmt = insert(TrainerStep)
    cols = ("version", "consumed", "dropped", "metrics", "started_at", "finished_at")
    sets: dict[str, Any] = {c: getattr(stmt.excluded, c) for c in cols}
    sets["rolled_back"] = False
    return stmt.on_conflict_do_update(index_elements=["run_id", "step"], set_=sets)


async def _inherit_rollbacks(conn: Any, run_id: str) -> None:
    """A version published from a rolled-back parent (the trainer finished a step while the
    rollback was on its way) is rolled back too, and its unfinished trajectories discarded."""
    while True:
        inherited = [
            int(v)
            for (v,) in await conn.execute(
                text(
                    "UPDATE policy_versions c SET status = 'rolled_back' FROM policy_versions p"
                    " WHERE c.run_id = :run AND p.run_id = :run AND c.parent = p.version"
                    " AND p.status = 'rolled_back' AND c.status <> 'rolled_back' RETURNING c.version"
                ),
                {"run": run_id},
            )
        ]
        if not inherited:
            return
        await conn.execute(
            text(
                "UPDATE trajectories SET status = 'discarded_rolled_back', finished_at = now(),"
                " reason = 'generated by a version whose parent was rolled back'"
                " WHERE run_id = :run AND status IN ('requested', 'generated', 'scored')"
                " AND (first_version = ANY(:v) OR last_version = ANY(:v))"
            ),
            {"run": run_id, "v": inherited},
        )


async def _roll_back_undone_steps(conn: Any, run_id: str, steps: Sequence[int]) -> None:
    """Keep the steps of the timeline a rollback undid rolled back, however late their reports come
    (the trainer finishes the step it is on before it acts on a rollback): a step whose version is
    rolled back (also by inheritance, so a version announced after its step report counts), and a
    step in `steps` (just upserted) above a step still rolled back. A new-timeline report of step k
    comes after the trainer re-reported every step below k, so nothing below it is still rolled
    back; an undone one comes before any of them. Not caught: an undone step right after the target
    (no rolled-back step below it) that published no version."""
    await conn.execute(
        text(
            "UPDATE trainer_steps s SET rolled_back = true WHERE s.run_id = :run AND NOT s.rolled_back"
            " AND ((s.version <> 0 AND EXISTS (SELECT 1 FROM policy_versions p WHERE p.run_id = :run"
            " AND p.version = s.version AND p.status = 'rolled_back'))"
            " OR (s.step = ANY(:steps) AND EXISTS (SELECT 1 FROM trainer_steps b WHERE b.run_id = :run"
            " AND b.step < s.step AND b.rolled_back)))"
        ),
        {"run": run_id, "steps": list(steps)},
    )
