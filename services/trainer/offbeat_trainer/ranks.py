"""Multi-process training inside the service: rank 0 drives, the other ranks follow.

Under `torchrun --nproc-per-node N offbeat-trainer --config ...`, rank 0 is the service (bus,
batching, checkpoints, publication). Every call on `TrainCore` that is collective under FSDP2/DDP
(a step, gathering the full state, loading a checkpoint) is first broadcast from rank 0 as
`(operation, arguments)`; followers (ranks > 0, no bus) loop on those broadcasts, run the same
operation, and exit on `stop`. Checkpoints are loaded by every rank from the shared checkpoint
directory, so no weights travel through the broadcast.

Not covered: ranks on several hosts without a shared checkpoint directory.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from offbeat_trainer.train import TrainCore

log = logging.getLogger("offbeat.trainer.ranks")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(timeout_s: float) -> torch.device:
    """Join the torchrun group (NCCL on CUDA, gloo on CPU) when launched with several ranks."""
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    return device


class Driver:
    """Rank 0's handle: run an operation on every rank."""

    def __init__(self, core: TrainCore) -> None:
        self.core = core

    def call(self, op: str, *args: Any) -> Any:
        if self.core.world > 1:
            dist.broadcast_object_list([(op, args)], src=0)
        return getattr(self.core, op)(*args)

    def stop(self) -> None:
        if self.core.world > 1:
            dist.broadcast_object_list([("stop", ())], src=0)


def follow(core: TrainCore) -> None:
    """A follower rank's loop."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        op, args = box[0]
        if op == "stop":
            log.info("rank %d stopping", core.rank)
            return
        getattr(core, op)(*args)
