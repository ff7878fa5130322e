"""`offbeat-orchestrator`: thin entry point; heavy modules are imported only after arguments parse."""

from __future__ import annotations

from offbeat.service import load_service_config, run_service, service_parser
from offbeat_orchestrator.config import OrchestratorConfig


def main() -> None:
    args = service_parser(
        "orchestrator", "Runs the schedule, writes the ledger and serves the admin API."
    ).parse_args()
    run, config = load_service_config(args, "orchestrator", OrchestratorConfig)
    from offbeat_orchestrator.service import serve

    run_service("orchestrator", run, config, serve)


if __name__ == "__main__":
    main()
