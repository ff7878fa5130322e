"""Configuration of the orchestrator service: the `[orchestrator]` section of the run TOML."""

from __future__ import annotations

from offbeat.config import ServiceConfig


class OrchestratorConfig(ServiceConfig):
    """The `[orchestrator]` section."""
