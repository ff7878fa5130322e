"""Configuration of the scorer service: the `[scorer]` section of the run TOML.

The environments themselves come from the shared `[[envs]]` section and the tokenizer from
`[model] path`; this section holds only how the scorer runs them.
"""

from __future__ import annotations

from pydantic import Field

from offbeat.config import ServiceConfig


class ScorerConfig(ServiceConfig):
    """The `[scorer]` section."""

    max_in_flight: int = Field(1024, ge=1)
    """Completions one replica holds at once (fetched, unacked). Larger than `max_scoring` so pulls
    stay batched; held completions that wait for a scoring slot keep their ack deadline alive. Each
    holds its token ids and log-probs in memory (~0.5 MB at 65,536 tokens): lower it for long rollouts."""
    max_scoring: int = Field(64, ge=1)
    """Completions being scored at once (each `score` call): the bound on concurrency that protects
    the sandbox (its queue answers OVERLOADED past its limit) and the event loop."""
    publish_batch: int = Field(512, ge=1)
    """Most scored trajectories published in one pipelined batch (each still acked by the server
    before its completion is acked)."""
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
