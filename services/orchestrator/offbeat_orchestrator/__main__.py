"""`offbeat-orchestrator`: thin entry point; heavy modules are imported only after arguments parse."""

from __future__ import annotations

import functools
from pathlib import Path

from offbeat.config import ConfigError
from offbeat.service import config_exit, load_service_config, run_service, service_parser
from offbeat_orchestrator.config import OrchestratorConfig


def main() -> None:
    args = service_parser(
        "orchestrator", "Runs the schedule, writes the ledger and serves the admin API."
    ).parse_args()
    run, config = load_service_config(args, "orchestrator", OrchestratorConfig)
    from offbeat_orchestrator.auth import load_token
    from offbeat_orchestrator.service import load_envs, serve

    # refused here, before the run row is written, with EX_CONFIG: restarting cannot fix them
    if config.admin_token_file:
        try:
            load_token(config.admin_token_file, fallback_dir=Path(run.run.state_dir))
        except ValueError as exc:
            config_exit("orchestrator", ConfigError(f"orchestrator.admin_token_file: {exc}"))
    try:
        envs = load_envs(run.envs)
    except (KeyError, ValueError, TypeError) as exc:
        config_exit("orchestrator", ConfigError(f"envs: {exc}"))
    run_service("orchestrator", run, config, functools.partial(serve, envs=envs))


if __name__ == "__main__":
    main()
