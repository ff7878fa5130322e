"""Configuration of the inference service: the `[inference]` section of the run TOML."""

from __future__ import annotations

from offbeat.config import ServiceConfig


class InferenceConfig(ServiceConfig):
    """The `[inference]` section."""
