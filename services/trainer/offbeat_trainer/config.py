"""Configuration of the trainer service: the `[trainer]` section of the run TOML."""

from __future__ import annotations

from offbeat.config import ServiceConfig


class TrainerConfig(ServiceConfig):
    """The `[trainer]` section."""
