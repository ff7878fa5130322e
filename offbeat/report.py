"""`offbeat report RUN`: PNG plots and one HTML page for a run, from the ledger alone.

Plots: reward per trainer step with eval reward per policy version, the staleness histogram of
trained trajectories, throughput (trajectories scored per minute), and trajectory fates, with
the most common reasons samples were not trained.
`--wandb` also logs the run's steps and eval rewards to Weights & Biases (`offbeat.wandb_sink`),
with the `[wandb]` section of the run's stored config (`--wandb-project` for a run without one).
Not covered: live metrics (that is `offbeat run`'s progress and each service's /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import text

from offbeat.ledger import Ledger
from offbeat.progress import not_trained


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run id")
    p.add_argument("--database-url", help="ledger URL (default: the embedded one under --state-dir)")
    p.add_argument("--state-dir", default=".offbeat", help="state directory of local runs")
    p.add_argument("--out", help="output directory (default: <state-dir>/runs/<run>/report)")
    p.add_argument("--wandb", action="store_true", help="also log the run to W&B ([wandb] of its config)")
    p.add_argument("--wandb-project", help="W&B project (instead of the one in the run's config)")
    p.add_argument("--wandb-mode", choices=["offline", "online"], help="W&B mode (instead of the config's)")


def main(args: argparse.Namespace) -> int:
    from offbeat.wandb_sink import WandbMissingError, require_wandb

    if args.wandb or args.wandb_project:
        try:
            require_wandb()  # before a server is started or a file written
        except WandbMissingError as exc:
            print(f"offbeat report: {exc}", file=sys.stderr)
            return 1
    url = args.database_url
    started = None
    if url is None:
        from offbeat.infra import Infra

        infra = Infra.load(Path(args.state_dir) / "infra")
        if infra is None:
            print(
                f"offbeat report: no --database-url and no embedded ledger under {args.state_dir}/infra",
                file=sys.stderr,
            )
            return 1
        if not infra.postgres.running():
            infra.postgres.restart()
            started = infra.postgres
        url = infra.postgres.url
    out = Path(args.out) if args.out else Path(args.state_dir) / "runs" / args.run / "report"
    try:
        page = asyncio.run(write_report(url, args.run, out))
        if args.wandb or args.wandb_project:
            overrides = {"project": args.wandb_project, "mode": args.wandb_mode}
            where = asyncio.run(
                log_to_wandb(
                    url,
                    args.run,
                    default_dir=args.state_dir,
                    overrides={k: v for k, v in overrides.items() if v},
                )
            )
            print(f"W&B: {where}")
    except (ValueError, WandbMissingError) as exc:
        print(f"offbeat report: {exc}", file=sys.stderr)
        return 1
    finally:
        if started is not None:
            started.stop()
    print(page)
    return 0


async def log_to_wandb(
    database_url: str, run_id: str, *, default_dir: str | Path, overrides: dict[str, Any] | None = None
) -> str:
    """Log a run's steps, eval rewards and fates from the ledger to W&B; return where they went.

    The W&B settings are the `[wandb]` section of the run's config as stored in the ledger, with
    `overrides` (e.g. `project`, `mode`) on top.
    """
    from pydantic import ValidationError

    from offbeat.wandb_sink import WandbConfig, WandbSink

    ledger = Ledger.connect(database_url, pool_size=1)
    try:
        q = await _fetch(ledger, run_id)
    finally:
        await ledger.close()
    config = q["config"] or {}
    try:
        cfg = WandbConfig.model_validate({**(config.get("wandb") or {}), **(overrides or {})})
    except ValidationError as exc:
        raise ValueError(f"[wandb]: {exc}") from None
    if not cfg.enabled:
        raise ValueError(f"run {run_id!r} has no [wandb] project in its config: pass --wandb-project")
    steps = [(s, v, m) for s, v, m in q["history"]]

    def log() -> str:
        sink = WandbSink.open(cfg, run_id=run_id, config=config, default_dir=default_dir)
        sink.close(steps, q["evals"], q["fates"])
        return sink.where

    return await asyncio.to_thread(log)


async def _fetch(ledger: Ledger, run_id: str) -> dict[str, Any]:
    """Everything the report shows of `run_id`; ValueError if the ledger has no such run."""
    async with ledger.engine.connect() as conn:
        if (await conn.execute(text("SELECT 1 FROM runs WHERE id=:r"), {"r": run_id})).first() is None:
            known = [
                r[0] for r in await conn.execute(text("SELECT id FROM runs ORDER BY created_at DESC LIMIT 5"))
            ]
            raise ValueError(f"no run {run_id!r} in the ledger (latest: {', '.join(known) or 'none'})")
    history = await ledger.step_metrics(run_id)
    q: dict[str, Any] = {
        "history": history,
        "steps": [(step, metrics) for step, _, metrics in history],
        "evals": await ledger.eval_rewards(run_id),
    }
    async with ledger.engine.connect() as conn:
        q["scored_at"] = [
            row[0].timestamp()
            for row in await conn.execute(
                text(
                    "SELECT scored_at FROM trajectories WHERE run_id=:r AND scored_at IS NOT NULL ORDER BY scored_at"
                ),
                {"r": run_id},
            )
        ]
        q["config"] = (
            await conn.execute(text("SELECT config FROM runs WHERE id=:r"), {"r": run_id})
        ).scalar()
    q["staleness"] = await ledger.staleness_histogram(run_id)
    q["fates"] = await ledger.trajectory_fates(run_id)
    q["not_trained"] = await ledger.not_trained_reasons(run_id)
    return q


def _plots(q: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [s for s, m in q["steps"] if "reward_mean" in m]
    ax.plot(
        steps, [m["reward_mean"] for s, m in q["steps"] if "reward_mean" in m], label="train reward (mean)"
    )
    if q["evals"]:
        ax.plot([s for _, s, _ in q["evals"]], [e for _, _, e in q["evals"]], "o-", label="eval reward")
    ax.set_xlabel("trainer step")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    names.append(_save(fig, out, "reward.png"))

    fig, ax = plt.subplots(figsize=(5, 4))
    hist = q["staleness"]
    ax.bar([str(k) for k in hist], list(hist.values()))
    ax.set_xlabel("staleness (trainer steps)")
    ax.set_ylabel("trained trajectories")
    names.append(_save(fig, out, "staleness.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    times = q["scored_at"]
    if times:
        t0 = times[0]
        minutes = [(t - t0) / 60 for t in times]
        bins = max(1, int(minutes[-1] * 4) + 1)
        ax.hist(minutes, bins=bins)
    ax.set_xlabel("minutes since first scored trajectory")
    ax.set_ylabel("trajectories scored per bin (15 s)")
    names.append(_save(fig, out, "throughput.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    fates = q["fates"]
    ax.barh(list(fates), list(fates.values()))
    ax.set_xlabel("trajectories")
    names.append(_save(fig, out, "fates.png"))
    return names


def _save(fig: Any, out: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


async def write_report(database_url: str, run_id: str, out: Path) -> Path:
    ledger = Ledger.connect(database_url, pool_size=1)
    try:
        q = await _fetch(ledger, run_id)
    finally:
        await ledger.close()
    out.mkdir(parents=True, exist_ok=True)
    images = await asyncio.to_thread(_plots, q, out)
    evals = q["evals"]
    rows = [
        ("trainer steps", str(len(q["steps"]))),
        (
            "eval reward",
            " -> ".join(f"{e:.3f} (v{v})" for v, _, e in (evals[:1] + evals[-1:])) if evals else "-",
        ),
        ("trajectories", ", ".join(f"{k}: {v}" for k, v in sorted(q["fates"].items()))),
        ("not trained, most common", not_trained(q["not_trained"], width=200) or "-"),
    ]
    body = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    imgs = "\n".join(f'<img src="{name}" alt="{name}">' for name in images)
    config = html.escape(json.dumps(q["config"], indent=2)) if q["config"] else ""
    page = out / "index.html"
    page.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>offbeat run {html.escape(run_id)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}img{max-width:48%;margin:1%}th{text-align:left;"
        "padding-right:1em}</style></head><body>"
        f"<h1>offbeat run {html.escape(run_id)}</h1><table>{body}</table>{imgs}"
        f"<h2>Resolved config</h2><pre>{config}</pre></body></html>"
    )
    (out / "summary.json").write_text(
        json.dumps(
            {
                "run": run_id,
                "fates": q["fates"],
                "not_trained": [{"status": st, "reason": r, "count": n} for st, r, n in q["not_trained"]],
                "evals": evals,
                "staleness": q["staleness"],
            },
            indent=2,
        )
    )
    return page
