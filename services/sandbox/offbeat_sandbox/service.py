"""The sandbox service's main loop."""

from __future__ import annotations

from offbeat.service import ServiceContext
from offbeat_sandbox.config import SandboxConfig


async def serve(ctx: ServiceContext[SandboxConfig]) -> None:
    ctx.set_healthy()
    await ctx.stop.wait()
