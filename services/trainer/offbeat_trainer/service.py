"""The trainer service's main loop."""

from __future__ import annotations

from offbeat.service import ServiceContext
from offbeat_trainer.config import TrainerConfig


async def serve(ctx: ServiceContext[TrainerConfig]) -> None:
    ctx.set_healthy()
    await ctx.stop.wait()
