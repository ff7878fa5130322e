"""`offbeat-trainer`: thin entry point; heavy modules are imported only after arguments parse.

`offbeat-trainer --config run.toml [--resume]` runs the service; `offbeat-trainer sft ...` runs
supervised fine-tuning (see `offbeat_trainer.sft`). Under torchrun, ranks above 0 become
followers of rank 0 (see `offbeat_trainer.ranks`); a follower with LOCAL_RANK 0 serves its host's
/healthz (see `offbeat_trainer.follower`).
"""

from __future__ import annotations

import functools
import os
import sys

from offbeat.config import ConfigError
from offbeat.service import config_exit, load_service_config, run_service, service_parser
from offbeat_trainer.config import TrainerConfig, check_run


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sft"]:
        from offbeat_trainer.sft_cli import main as sft_main

        sft_main(argv[1:])
        return
    parser = service_parser("trainer", "Turns scored trajectories into new policy versions.")
    parser.epilog = "Subcommand: `offbeat-trainer sft --help` for supervised fine-tuning."
    args = parser.parse_args(argv)
    run, config = load_service_config(args, "trainer", TrainerConfig)
    try:
        check_run(config, run)
    except ConfigError as exc:
        config_exit("trainer", exc)
    if int(os.environ.get("RANK", "0")) > 0:
        from offbeat_trainer.follower import run_follower

        run_follower(run, config)
        return
    from offbeat_trainer.service import serve

    run_service("trainer", run, config, functools.partial(serve, resume=args.resume))


if __name__ == "__main__":
    main()
