"""The inference service's main loop."""

from __future__ import annotations

from offbeat.service import ServiceContext
from offbeat_inference.config import InferenceConfig


async def serve(ctx: ServiceContext[InferenceConfig]) -> None:
    ctx.set_healthy()
    await ctx.stop.wait()
