"""A follower rank of the trainer under torchrun: builds the same model and `TrainCore`, then
runs what rank 0 broadcasts (see `ranks.py`). It holds no bus connection and writes nothing.

Each host's (pod's) probes need an answer, and rank 0 is on one host only: the follower with
`LOCAL_RANK` 0 serves the service's own `/healthz` and `/metrics` (`offbeat.service.HealthServer`)
on `[trainer] health_host`/`health_port`, 503 until its rank loop runs, 200 while it does, and
gone when it ends or fails. The other local ranks bind nothing (one port per host). On the host
of rank 0 (local rank 0 there), the service itself answers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from offbeat.config import RunConfig
from offbeat.service import HealthServer, setup_logging
from offbeat_trainer.config import TrainerConfig

log = logging.getLogger("offbeat.trainer.follower")


def follower_health(
    run: RunConfig, config: TrainerConfig, env: Mapping[str, str] = os.environ
) -> HealthServer | None:
    """The host's health server, started (unhealthy) when this process has local rank 0; else None."""
    if int(env.get("LOCAL_RANK", "0")) != 0:
        return None
    details: dict[str, Any] = {
        "service": "trainer",
        "role": "follower",
        "rank": int(env.get("RANK", "0")),
        "run": run.run.id,
    }
    health = HealthServer(config.health_host, config.health_port, lambda: details)
    details["health_port"] = health.port
    log.info("health server started", extra={"health_port": health.port, "rank": details["rank"]})
    return health


def run_follower(run: RunConfig, config: TrainerConfig) -> None:
    setup_logging("trainer", config.log_level)
    health = follower_health(run, config)
    try:
        import torch

        from offbeat_trainer.ranks import follow, init_process_group
        from offbeat_trainer.train import CoreSettings, TrainCore, load_model

        torch.manual_seed(run.run.seed)
        device = init_process_group(config.dist_timeout_s)
        model = load_model(
            run.model.path, dtype=run.model.dtype, attn_implementation=config.attn_implementation
        )
        core = TrainCore(model, CoreSettings.from_config(config), device=device)
        if health is not None:
            health.healthy = True
        follow(core)
    finally:
        if health is not None:
            health.healthy = False
            health.close()
