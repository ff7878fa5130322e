"""Configuration of the orchestrator service: the `[orchestrator]` section of the run TOML.

The shape of the run (group size, groups per step, staleness bound, max steps) is in `[run]`, the
ledger's batching in `[ledger]`; this section holds what only the orchestrator decides: the admin
API's address, credentials and TLS, request time-outs, evaluation, difficulty filtering and the
sampling parameters of the requests it sends.

Not covered: the admin token itself. It comes from `OFFBEAT_ADMIN_TOKEN` or the file named by
`admin_token_file`, and never appears in the resolved config.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from offbeat.config import DEFAULT_TEMPERATURE, MIN_TEMPERATURE, ServiceConfig, Strict


def sampleable_temperature(value: float) -> float:
    """`value` if inference will sample at it: 0 (greedy) or at least `MIN_TEMPERATURE`."""
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"a temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return value


class SamplingConfig(Strict):
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0)
    """Sampling temperature of training rollouts (the trainer's `temperature` must be the same):
    0 (greedy) or at least `offbeat.config.MIN_TEMPERATURE`."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass of training rollouts."""
    top_k: int = Field(0, ge=0)
    """Top-k of training rollouts; 0 disables it."""
    max_tokens: int = Field(256, ge=1)
    """Most completion tokens per sample."""
    stop: list[str] = Field(default_factory=list)
    """Stop strings; generation ends at the first one."""

    @field_validator("temperature")
    @classmethod
    def _sampleable(cls, value: float) -> float:
        return sampleable_temperature(value)


class OrchestratorConfig(ServiceConfig):
    """The `[orchestrator]` section."""

    admin_host: str = "127.0.0.1"
    """Address the admin gRPC API listens on (`0.0.0.0` to accept remote clients)."""
    admin_port: int = Field(50151, ge=0, le=65535)
    """Port of the admin gRPC API; 0 picks a free one. If it is taken, a free one is used with a
    warning. The port in use is in /healthz (`admin_port`) and `<state_dir>/<run>/admin.address`."""
    admin_token_file: str = ""
    """File holding the admin bearer token; empty: the `OFFBEAT_ADMIN_TOKEN` environment variable."""
    tls_cert_file: str = ""
    """PEM certificate chain of the admin API; with `tls_key_file` the API serves TLS only."""
    tls_key_file: str = ""
    """PEM private key of the admin API's certificate."""
    request_timeout_s: float = Field(300.0, gt=0)
    """A request whose completions have not all arrived after this long is re-issued (attempt + 1)."""
    max_attempts: int = Field(3, ge=1)
    """Issues of one request; after the last one times out its missing samples are `failed`."""
    live_wait_timeout_s: float = Field(120.0, gt=0)
    """How long dispatch waits for inference to serve a newly published version before it stops
    counting the lag (so a missing PolicyLive slows the run but never stalls it)."""
    stall_timeout_s: float = Field(30.0, gt=0)
    """With the budget used, every group generated and no trainer step for this long (or 3x the
    longest step interval seen, if larger), one more step's worth of groups goes out (see the
    scheduler's stall guard)."""
    tick_s: float = Field(0.25, gt=0)
    """Period of the scheduler's loop when nothing wakes it (time-outs are checked each tick)."""
    eval_every: int = Field(0, ge=0)
    """Send the eval split every this many trainer steps (and at step 0); 0 disables evaluation."""
    eval_examples: int = Field(32, ge=1)
    """Eval prompts per environment per evaluation (the same prompts every time)."""
    eval_samples: int = Field(1, ge=1)
    """Samples per eval prompt."""
    eval_temperature: float = Field(0.0, ge=0)
    """Sampling temperature of eval requests; 0 is greedy (else at least `MIN_TEMPERATURE`)."""
    difficulty_filter: bool = False
    """Skip prompts whose training group came back all right or all wrong (no learning signal)."""
    difficulty_threshold: float = 0.5
    """A sample with reward >= this counts as right for the difficulty filter."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Sampling parameters of training requests."""
    status_refresh_s: float = Field(2.0, gt=0)
    """How often the status summary (health details, throughput window) is refreshed."""
    throughput_window_s: float = Field(60.0, gt=0)
    """Window over which GetStatus reports tokens/s and trajectories/s."""
    watch_queue_size: int = Field(1024, ge=1)
    """Events buffered per WatchEvents stream; a slower client loses the oldest ones."""

    @field_validator("eval_temperature")
    @classmethod
    def _sampleable(cls, value: float) -> float:
        return sampleable_temperature(value)
