"""`offbeat`: the command line. Subcommands import their heavy modules only when they run.

offbeat infra up|down|status   embedded nats-server + PostgreSQL under a state directory
offbeat ledger upgrade|downgrade
(run, report, admin, env and sandbox are added by their modules: see COMMANDS)
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

# name -> (module, help); each module has `add_arguments(parser)` and `main(args) -> int | None`.
COMMANDS: dict[str, tuple[str, str]] = {
    "infra": ("offbeat.cli", "start, stop or inspect the embedded NATS and PostgreSQL"),
    "ledger": ("offbeat.cli", "apply or revert the ledger's migrations"),
    "run": ("offbeat.launcher", "run a job from a TOML config on the embedded stack"),
    "report": ("offbeat.report", "plots and an HTML page for a run, from the ledger"),
    "admin": ("offbeat.admin_cli", "talk to a running orchestrator's admin API"),
    "env": ("offbeat.envs.cli", "list environments and show sample prompts"),
    "sandbox": ("offbeat.sandbox_client", "run code through the sandbox service"),
}


def _infra_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument(
        "--state-dir",
        default=".offbeat",
        help="state directory of local runs: the servers live in <state-dir>/infra, where offbeat run and "
        "offbeat report find them",
    )
    p.add_argument("--json", action="store_true", help="print the URLs as JSON")
    p.add_argument("--config", help="up: a run TOML whose [bus] max_payload_bytes the NATS server allows")
    p.add_argument("--max-payload-bytes", type=int, help="up: largest NATS message (default: from --config)")


def _infra_main(args: argparse.Namespace) -> int:
    from offbeat.config import ConfigError, load_run_config, mask_url
    from offbeat.infra import Infra, InfraError

    state = Path(args.state_dir) / "infra"
    if args.action == "up":
        try:
            max_payload = args.max_payload_bytes or load_run_config(args.config).bus.max_payload_bytes
            infra = Infra.up(state, max_payload_bytes=max_payload)
        except (ConfigError, InfraError) as exc:
            print(f"offbeat infra up: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(infra.urls) if args.json else "\n".join(f"{k}: {v}" for k, v in infra.urls.items()))
        return 0
    existing = Infra.load(state)
    if existing is None:
        print(f"no infrastructure recorded under {state}", file=sys.stderr)
        return 1
    if args.action == "down":
        existing.down()
        print("stopped")
        return 0
    status = existing.status()
    shown = {k: mask_url(v) if isinstance(v, str) else v for k, v in status.items()}
    print(json.dumps(shown) if args.json else "\n".join(f"{k}: {v}" for k, v in shown.items()))
    return 0 if status["nats_running"] and status["postgres_running"] else 1


def _ledger_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["upgrade", "downgrade"])
    p.add_argument("--database-url", required=True)
    p.add_argument("--revision", default=None)


def _ledger_main(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import OperationalError

    from offbeat.config import mask_url
    from offbeat.ledger import downgrade, upgrade

    try:
        if args.action == "upgrade":
            upgrade(args.database_url, args.revision or "head")
        else:
            downgrade(args.database_url, args.revision or "base")
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        print(f"offbeat ledger {args.action}: {mask_url(args.database_url)}: {reason}", file=sys.stderr)
        return 1
    return 0


LOCAL: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "infra": (_infra_arguments, _infra_main),
    "ledger": (_ledger_arguments, _ledger_main),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="offbeat", description="Asynchronous RL post-training for language models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    mains: dict[str, Callable[[argparse.Namespace], int | None]] = {}
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name in LOCAL:
            LOCAL[name][0](p)
            mains[name] = LOCAL[name][1]
        elif name == wanted:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as exc:
                raise SystemExit(f"offbeat {name}: not available ({exc.name} is not installed)") from None
            mod.add_arguments(p)
            mains[name] = mod.main
    args = parser.parse_args(argv)
    raise SystemExit(mains[args.command](args) or 0)


if __name__ == "__main__":
    main()
