"""Live progress of a run, read from the ledger and the bus: what `offbeat run` shows.

Step, reward, eval reward, staleness, tokens/s, trajectory fates and queue depths, refreshed
every few seconds as a rich table (or one log line per refresh when not on a terminal); with a
W&B sink (`offbeat.wandb_sink`), every refresh also logs the steps it has not logged yet.
Not covered: writing to the ledger; the orchestrator is its only writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from offbeat.config import RunConfig
from offbeat.ledger import Ledger

if TYPE_CHECKING:
    from offbeat.wandb_sink import WandbSink


@dataclass
class Snapshot:
    step: int = 0
    version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)  # every step's
    evals: list[tuple[int, int, float]] = field(default_factory=list)  # (version, step, eval reward)
    fates: dict[str, int] = field(default_factory=dict)
    queues: dict[str, tuple[int, int]] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


async def snapshot(ledger: Ledger, run_id: str, bus: Any | None = None) -> Snapshot:
    snap = Snapshot()
    steps = await ledger.step_metrics(run_id)
    snap.history = steps
    if steps:
        snap.step, snap.version, snap.metrics = steps[-1]
    snap.evals = await ledger.eval_rewards(run_id)
    snap.fates = await ledger.trajectory_fates(run_id)
    if bus is not None:
        for consumer in ("inference", "scorer", "trainer", "ledger"):
            with contextlib.suppress(Exception):
                snap.queues[consumer] = await bus.consumer_pending(consumer)
    return snap


def describe(snap: Snapshot, max_steps: int) -> list[tuple[str, str]]:
    m = snap.metrics
    first_eval = f"{snap.evals[0][2]:.3f} (v{snap.evals[0][0]})" if snap.evals else "-"
    last_eval = (
        f"{snap.evals[-1][2]:.3f} (v{snap.evals[-1][0]}, step {snap.evals[-1][1]})" if snap.evals else "-"
    )
    stale = (
        f"{m.get('staleness_mean', 0):.2f} mean / {m.get('staleness_max', 0):.0f} max"
        if "staleness_mean" in m
        else "-"
    )
    queues = ", ".join(f"{k} {p}+{a}" for k, (p, a) in snap.queues.items()) or "-"
    fates = ", ".join(f"{k} {v}" for k, v in sorted(snap.fates.items())) or "-"
    return [
        ("step", f"{snap.step}/{max_steps} (head v{snap.version})"),
        ("reward", f"{m['reward_mean']:.3f}" if "reward_mean" in m else "-"),
        ("eval reward", f"{first_eval} -> {last_eval}"),
        ("staleness", stale),
        ("tokens/s", f"{m['tokens_per_s']:.0f}" if "tokens_per_s" in m else "-"),
        ("trajectories", fates),
        ("queues (pending+unacked)", queues),
    ]


class Progress:
    def __init__(
        self, run: RunConfig, ledger: Ledger, bus: Any, *, live: bool, wandb: WandbSink | None = None
    ) -> None:
        self.run = run
        self.ledger = ledger
        self.bus = bus
        self.live = live and sys.stdout.isatty()
        self.wandb = wandb
        self.last = Snapshot()
        self._wandb_error = ""

    @classmethod
    async def open(
        cls, run: RunConfig, nats_url: str, database_url: str, *, live: bool, wandb: WandbSink | None = None
    ) -> Progress:
        from offbeat.bus import Bus

        bus = await Bus.connect(
            run.bus.model_copy(update={"nats_url": nats_url}), run.run.id, name="offbeat-run"
        )
        return cls(run, Ledger.connect(database_url, pool_size=1), bus, live=live, wandb=wandb)

    async def close(self) -> None:
        try:
            if self.wandb is not None:
                snap = await snapshot(self.ledger, self.run.run.id)
                await asyncio.to_thread(self.wandb.close, snap.history, snap.evals, snap.fates)
        finally:
            if self.bus is not None:
                await self.bus.close()
            await self.ledger.close()

    async def follow(self, stop: asyncio.Event, *, interval_s: float) -> None:
        """Refresh until `stop` is set or the trainer reaches max_steps."""
        max_steps = self.run.run.max_steps
        if self.live:
            from rich.live import Live

            with Live(self._table(), refresh_per_second=2, transient=False) as live:
                while not stop.is_set():
                    await self._refresh(stop, max_steps)
                    live.update(self._table())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=interval_s)
            return
        last_step = -1
        while not stop.is_set():
            await self._refresh(stop, max_steps)
            if self.last.step != last_step:
                last_step = self.last.step
                print(
                    "[offbeat] " + " | ".join(f"{k}: {v}" for k, v in describe(self.last, max_steps)),
                    flush=True,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)

    async def _refresh(self, stop: asyncio.Event, max_steps: int) -> None:
        with contextlib.suppress(Exception):
            self.last = await snapshot(self.ledger, self.run.run.id, self.bus)
        if self.wandb is not None:
            snap = self.last
            try:  # W&B trouble never stops a run: the ledger has every figure
                await asyncio.to_thread(self.wandb.log, snap.history, snap.evals, snap.fates)
            except Exception as exc:
                if str(exc) != self._wandb_error:
                    self._wandb_error = str(exc)
                    print(
                        f"[offbeat] W&B logging failed (the run goes on): {exc}", file=sys.stderr, flush=True
                    )
        if self.last.step >= max_steps:
            stop.set()

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(title=f"offbeat run {self.run.run.id}", show_header=False)
        for key, value in describe(self.last, self.run.run.max_steps):
            table.add_row(key, value)
        return table

    async def wait_final_eval(self, *, timeout_s: float) -> None:
        """Wait until the newest version has an eval reward and no eval sample is still on its way
        (the ledger's eval reward is the mean of those scored so far), or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            snap = await snapshot(self.ledger, self.run.run.id)
            if snap.evals and snap.evals[-1][1] >= snap.step and not await self._open_evals():
                self.last = snap
                return
            await asyncio.sleep(1.0)

    async def _open_evals(self) -> int:
        from sqlalchemy import text

        async with self.ledger.engine.connect() as conn:
            result = await conn.execute(
                text(
                    "SELECT count(*) FROM trajectories WHERE run_id = :run AND eval "
                    "AND status IN ('requested', 'generated', 'scored')"
                ),
                {"run": self.run.run.id},
            )
            return int(result.scalar_one())

    async def summary(self) -> str:
        snap = await snapshot(self.ledger, self.run.run.id)
        lines = [f"{k}: {v}" for k, v in describe(snap, self.run.run.max_steps)[:-1]]
        if len(snap.evals) >= 2:
            lines.append(f"eval reward rose by {snap.evals[-1][2] - snap.evals[0][2]:+.3f}")
        lines += train_trend(snap.history)
        reasons = await self.ledger.not_trained_reasons(self.run.run.id, limit=SUMMARY_REASONS)
        if reasons:
            lines.append(f"not trained, most common: {not_trained(reasons)}")
        return "\n  ".join(["summary:", *lines])


SUMMARY_REASONS = 3
"""Reasons the closing summary names for samples that were not trained."""


def train_trend(history: list[tuple[int, int, dict[str, Any]]]) -> list[str]:
    """The summary's lines on training: the mean train reward of the first steps against the last
    ones (one step's reward is noisy), and the steps that trained nothing because every group's
    rewards were equal (a policy collapsed to all-wrong, or a task all right or all wrong)."""
    steps = [(step, m) for step, _, m in history if "reward_mean" in m]
    if not steps:
        return []
    k = min(10, max(1, len(steps) // 6))
    first, last = steps[:k], steps[-k:]

    def mean(rows: list[tuple[int, dict[str, Any]]]) -> float:
        return sum(float(m["reward_mean"]) for _, m in rows) / len(rows)

    def span(rows: list[tuple[int, dict[str, Any]]]) -> str:
        return f"step {rows[0][0]}" if len(rows) == 1 else f"steps {rows[0][0]}-{rows[-1][0]}"

    lines = [f"train reward: {mean(first):.3f} ({span(first)}) -> {mean(last):.3f} ({span(last)})"]
    idle = [  # samples kept, none trained: their groups' advantages were all zero
        step
        for step, m in steps
        if m.get("consumed", 0) > m.get("dropped", 0) and not m.get("trained_sequences", 1)
    ]
    if idle:
        lines.append(
            f"no gradient in {len(idle)} of {len(steps)} steps (every group's rewards equal), "
            f"the last at step {idle[-1]}"
        )
    return lines


def not_trained(reasons: list[tuple[str, str, int]], *, width: int = 90) -> str:
    """`Ledger.not_trained_reasons` as one line: `12 failed (reason); 3 discarded_stale (stale)`."""
    return "; ".join(
        f"{n} {status} ({reason if len(reason) <= width else reason[: width - 1] + '…'})"
        for status, reason, n in reasons
    )
