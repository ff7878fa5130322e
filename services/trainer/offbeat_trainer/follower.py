"""A follower rank of the trainer under torchrun: builds the same model and `TrainCore`, then
runs what rank 0 broadcasts (see `ranks.py`). It holds no bus connection and writes nothing."""

from __future__ import annotations

from offbeat.config import RunConfig
from offbeat.service import setup_logging
from offbeat_trainer.config import TrainerConfig


def run_follower(run: RunConfig, config: TrainerConfig) -> None:
    import torch

    from offbeat_trainer.ranks import follow, init_process_group
    from offbeat_trainer.train import CoreSettings, TrainCore, load_model

    setup_logging("trainer", config.log_level)
    torch.manual_seed(run.run.seed)
    device = init_process_group(config.dist_timeout_s)
    model = load_model(run.model.path, dtype=run.model.dtype, attn_implementation=config.attn_implementation)
    follow(TrainCore(model, CoreSettings.from_config(config), device=device))
