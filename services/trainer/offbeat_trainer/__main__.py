"""`offbeat-trainer`: thin entry point; heavy modules are imported only after arguments parse."""

from __future__ import annotations

from offbeat.service import load_service_config, run_service, service_parser
from offbeat_trainer.config import TrainerConfig


def main() -> None:
    args = service_parser("trainer", "Turns scored trajectories into new policy versions.").parse_args()
    run, config = load_service_config(args, "trainer", TrainerConfig)
    from offbeat_trainer.service import serve

    run_service("trainer", run, config, serve)


if __name__ == "__main__":
    main()
