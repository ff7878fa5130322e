"""Configuration of the scorer service: the `[scorer]` section of the run TOML."""

from __future__ import annotations

from offbeat.config import ServiceConfig


class ScorerConfig(ServiceConfig):
    """The `[scorer]` section."""
