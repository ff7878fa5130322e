"""Configuration of the scorer service: the `[scorer]` section of the run TOML.

The environments themselves come from the shared `[[envs]]` section and the tokenizer from
`[model] path`; this section holds only how the scorer runs them.
"""

from __future__ import annotations

from pydantic import Field

from offbeat.config import ServiceConfig


class ScorerConfig(ServiceConfig):
    """The `[scorer]` section."""

    max_in_flight: int = Field(256, ge=1)
    """Completions scored at once by one replica (each in its own task): the bound on concurrency.
    Sandbox-bound environments wait on I/O, so this is larger than the core count."""
    score_timeout_s: float = Field(120.0, gt=0)
    """Longest time one `score` (or one group's `score_group`) may take; past it the reward's status
    is `timeout`. Sandbox calls have their own, shorter timeouts inside the environment."""
    keepalive_every_s: float = Field(10.0, gt=0)
    """While a completion is being scored longer than this, its ack deadline is extended
    (`in_progress`) this often, so slow sandbox runs are not redelivered. Capped at a third of
    `[bus] ack_wait_s`."""
    group_timeout_s: float = Field(60.0, gt=0)
    """For environments with a group reward: how long to wait for the rest of a group before
    scoring the members that arrived (the reason then says the group was partial)."""
    tokenizer_path: str = ""
    """Tokenizer to detokenize completions with; empty means `[model] path`."""
    sandbox_subject: str = ""
    """Subject of the sandbox service; empty means `<bus prefix>.sandbox.exec`."""
    rate_window_s: float = Field(10.0, gt=0)
    """Window over which the scored/s gauge is computed."""
