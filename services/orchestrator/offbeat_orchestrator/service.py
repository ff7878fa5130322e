"""The orchestrator service's main: migrate, record the run, then writer + scheduler + admin API.

It also turns the run's messages that ran out of deliveries into dead letters
(`Bus.dead_letter_undelivered`), since the server itself only announces them.

Start-up order: Alembic `upgrade` of the ledger, the run row with the resolved config, the ledger
catching up with the run's stream (`LedgerWriter.catch_up`: what a crashed orchestrator sent just
before it died is in the ledger before anything is restored from it), the scheduler (it reads its
trainer step and the groups in flight back from the ledger, so a restarted orchestrator
continues), then the ledger writer (so every event is recorded) and the admin API. A task that
fails (the writer's, when it can no longer commit) ends the service with its error, for the
supervisor to restart it. On SIGTERM the admin API stops first, then the scheduler, then the
writer flushes and acks what it holds. The admin address is written to
`<state_dir>/<run>/admin.address` (useful with `admin_port = 0`).

Not covered: starting the other services (`offbeat run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from offbeat.config import DEFAULT_ROLLBACK_WINDOW, EnvSpec, resolved_dump
from offbeat.ledger import Ledger, upgrade
from offbeat.service import ServiceContext
from offbeat_orchestrator.admin import AdminContext, AdminServer
from offbeat_orchestrator.auth import load_token
from offbeat_orchestrator.config import OrchestratorConfig
from offbeat_orchestrator.ledger_writer import LedgerWriter
from offbeat_orchestrator.scheduler import Scheduler

log = logging.getLogger("offbeat.orchestrator")


def load_envs(specs: list[EnvSpec]) -> list[tuple[str, float, Any]]:
    if not specs:
        return []
    from offbeat.envs import load

    return [(spec.name, spec.weight, load(spec.name, **spec.args)) for spec in specs]


async def serve(
    ctx: ServiceContext[OrchestratorConfig], envs: list[tuple[str, float, Any]] | None = None
) -> None:
    """The orchestrator until `ctx.stop`; `envs` as `load_envs` built them (loaded here if not given)."""
    run, cfg = ctx.run, ctx.config
    run_id = run.run.id
    await asyncio.to_thread(upgrade, run.ledger.database_url)
    ledger = Ledger.connect(run.ledger.database_url, pool_size=run.ledger.pool_size)
    admin: AdminServer | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        await ledger.upsert_run(run_id, config=resolved_dump(run))
        trainer_section = (run.model_extra or {}).get("trainer", {})
        writer = LedgerWriter(ctx.bus, ledger, run.ledger, throughput_window_s=cfg.throughput_window_s)
        await writer.catch_up(stop=ctx.stop)
        scheduler = Scheduler(
            ctx.bus,
            run.run,
            cfg,
            envs if envs is not None else await asyncio.to_thread(load_envs, run.envs),
            writer=writer,
            start_step=await ledger.latest_step(run_id),
            zero_advantage_dropped=bool(trainer_section.get("filter_zero_advantage", False)),
        )
        scheduler.restore(await ledger.unfinished_groups(run_id))
        token, source = load_token(cfg.admin_token_file, fallback_dir=Path(run.run.state_dir) / run_id)
        admin = AdminServer(
            AdminContext(
                run_id=run_id,
                bus=ctx.bus,
                ledger=ledger,
                writer=writer,
                scheduler=scheduler,
                cfg=cfg,
                rollback_window=int(trainer_section.get("rollback_window", DEFAULT_ROLLBACK_WINDOW)),
            ),
            token,
        )
        tasks = [
            asyncio.create_task(writer.run(ctx.stop), name="ledger-writer"),
            asyncio.create_task(scheduler.run(ctx.stop), name="scheduler"),
            asyncio.create_task(ctx.bus.dead_letter_undelivered(stop=ctx.stop), name="undelivered"),
        ]
        await admin.start()
        run_dir = Path(run.run.state_dir) / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "admin.address").write_text(f"{cfg.admin_host}:{admin.port}\n")
        ctx.details.update(admin_port=admin.port, admin_tls=admin.tls, admin_token_from=source)
        ctx.set_healthy()
        finished = False
        while not ctx.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.stop.wait(), timeout=cfg.status_refresh_s)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.error("task %s failed: %r; the orchestrator stops", task.get_name(), task.exception())
                    raise task.exception()  # type: ignore[misc]
            ctx.details.update(
                step=scheduler.step,
                paused=scheduler.paused,
                groups_in_flight=len(scheduler.groups),
                events_written=writer.committed_events,
                stall_topups=scheduler.stall_topups,
            )
            if scheduler.finished and not finished:
                finished = True
                await ledger.set_run_status(run_id, "finished")
                log.info("trainer reached max_steps=%d; dispatch stopped", run.run.max_steps)
    finally:
        ctx.set_healthy(False)
        if admin is not None:
            await admin.stop()
        ctx.stop.set()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await ledger.close()
