"""The scorer service's main loop."""

from __future__ import annotations

from offbeat.service import ServiceContext
from offbeat_scorer.config import ScorerConfig


async def serve(ctx: ServiceContext[ScorerConfig]) -> None:
    ctx.set_healthy()
    await ctx.stop.wait()
