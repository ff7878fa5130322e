"""The orchestrator service's main loop."""

from __future__ import annotations

from offbeat.service import ServiceContext
from offbeat_orchestrator.config import OrchestratorConfig


async def serve(ctx: ServiceContext[OrchestratorConfig]) -> None:
    ctx.set_healthy()
    await ctx.stop.wait()
