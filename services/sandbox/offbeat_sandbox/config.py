"""Configuration of the sandbox service: the `[sandbox]` section of the run TOML."""

from __future__ import annotations

from offbeat.config import ServiceConfig


class SandboxConfig(ServiceConfig):
    """The `[sandbox]` section."""
