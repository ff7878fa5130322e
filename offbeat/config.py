"""Run configuration: one TOML file per run, validated by pydantic, overridable from outside.

The file has shared sections (`run`, `bus`, `ledger`, `model`, `envs`) that every service reads,
and one section per service (`[orchestrator]`, `[inference]`, ...) that only that service
validates, with its own model from its own package. Overrides, weakest first: the file, then
environment variables `OFFBEAT__SECTION__FIELD=value`, then `--set section.field=value`.
Values in overrides are parsed as TOML literals when they parse (`3`, `true`, `[1, 2]`), else
taken as strings. Errors name the field and the value given.

Not covered here: secrets. They come from the environment (`OFFBEAT_ADMIN_TOKEN`, URLs with
credentials) and are never stored in the resolved config that goes to the ledger.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "OFFBEAT__"
DEFAULT_ROLLBACK_WINDOW = 8
"""`[trainer] rollback_window` when unset: the orchestrator refuses rollbacks the trainer could not do."""
DEFAULT_TEMPERATURE = 1.0
"""`[orchestrator.sampling] temperature` and `[trainer] temperature` when unset (they must agree)."""
MIN_TEMPERATURE = 1e-3
"""The smallest positive sampling temperature. Below it sampling is greedy in all but name, a
plain `logits / T` leaves float32 (a logit of 40 over 1e-40 is inf, its log-prob NaN) and the
engines part ways (vLLM treats T < 1e-5 as greedy); greedy is asked for with 0."""
M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration that does not validate; the message names every bad field and its value."""


EX_CONFIG = 78
"""The exit status of a service whose configuration is wrong (sysexits' EX_CONFIG): a supervisor
that sees it knows that starting the service again cannot help."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Strict):
    id: str = Field("default", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """Run id: part of every subject, stream and ledger key. Letters, digits, `_` and `-`."""
    seed: int = 0
    """Seed for prompt order, sampling seeds and model initialisation."""
    state_dir: str = ".offbeat"
    """Where the embedded servers, checkpoints, weights and logs of local runs live."""
    max_staleness: int = Field(2, ge=0)
    """Largest trainer-step lag a trajectory may have when consumed; 0 is synchronous RL."""
    group_size: int = Field(8, ge=1)
    """Samples per prompt (a group); advantages are computed within a group."""
    groups_per_step: int = Field(4, ge=1)
    """Complete groups that make one trainer step."""
    max_steps: int = Field(100, ge=1)
    """Trainer steps after which the run is finished."""


class BusConfig(Strict):
    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server URL(s), comma-separated. Credentials may be in the URL or in OFFBEAT_NATS_* env."""
    prefix: str = Field("offbeat", pattern=r"^[A-Za-z0-9_-]+$")
    """First token of every per-run subject: `<prefix>.<run>.rollout.request`."""
    max_payload_bytes: int = Field(8 * 1024 * 1024, ge=1024 * 1024)
    """Largest message; 8 MiB fits a 65,536-token completion with log-probs many times over."""
    connect_timeout_s: float = Field(5.0, gt=0)
    """Timeout of one connection attempt; reconnects are retried forever."""
    reconnect_wait_s: float = Field(0.5, gt=0)
    """Pause between reconnect attempts."""
    publish_timeout_s: float = Field(10.0, gt=0)
    """How long a JetStream publish waits for the server's ack."""
    ack_wait_s: float = Field(60.0, gt=0)
    """How long a consumer may hold a message before the server redelivers it."""
    max_deliver: int = Field(5, ge=1)
    """Deliveries of one message before it is dead-lettered with its last error."""
    max_ack_pending: int = Field(4096, ge=1)
    """Messages a consumer may hold unacknowledged: the bus's backpressure."""
    nak_backoff_s: list[float] = Field(default_factory=lambda: [0.1, 0.5, 2.0, 5.0])
    """Delay before redelivery after the n-th failure (last value repeats)."""
    fetch_batch: int = Field(256, ge=1)
    """Messages asked for per pull."""
    fetch_timeout_s: float = Field(1.0, gt=0)
    """How long one pull waits for messages."""
    duplicate_window_s: float = Field(600.0, gt=0)
    """Window in which a repeated Nats-Msg-Id is discarded by the server."""
    stream_max_age_s: float = Field(7 * 24 * 3600.0, gt=0)
    """Oldest message a run's stream keeps."""
    stream_max_bytes: int = Field(2 * 1024**3, ge=1024**2)
    """Largest size of a run's stream (reserved on the server); past it publishers are refused
    (backpressure, never loss). Acked messages leave the stream, so this bounds what is in flight."""
    kv_history: int = Field(16, ge=1)
    """History kept per key in the run's KV bucket."""
    stream_replicas: int = Field(1, ge=1, le=5)
    """Replicas of the run's stream and KV bucket (3 on a 3-node JetStream cluster: R3)."""


class LedgerConfig(Strict):
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/offbeat"
    """SQLAlchemy URL of the ledger database (asyncpg or psycopg driver)."""
    pool_size: int = Field(5, ge=1)
    """Connections kept in the pool."""
    batch_size: int = Field(1000, ge=1)
    """Rows per batched upsert."""
    flush_interval_s: float = Field(0.2, gt=0)
    """Longest time an event waits in the writer's buffer."""


class ModelConfig(Strict):
    path: str = ""
    """Hugging Face id or local directory of the base model (loaded with the Auto classes)."""
    dtype: str = Field("float32", pattern=r"^(float32|bfloat16|float16)$")
    """Parameter dtype for inference and training."""
    max_model_len: int = Field(4096, ge=16, le=131072)
    """Longest prompt plus completion, in tokens (65,536 for INTELLECT-3-length rollouts)."""
    trust_remote_code: bool = False
    """Passed to the Auto classes."""


class EnvSpec(Strict):
    name: str
    """Environment name, e.g. `math`, `code`, `reasoning_gym:basic_arithmetic`."""
    weight: float = Field(1.0, gt=0)
    """Relative share of prompts drawn from this environment."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for `offbeat.envs.load`."""


class ServiceConfig(Strict):
    """Fields every service section has; a service's own model subclasses this."""

    health_host: str = "127.0.0.1"
    """Address of the /healthz and /metrics HTTP server."""
    health_port: int = Field(0, ge=0, le=65535)
    """Port of the /healthz and /metrics HTTP server; 0 picks a free one."""
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    """Log level of the service."""
    shutdown_timeout_s: float = Field(10.0, gt=0)
    """How long a SIGTERM'd service may take to drain before it exits anyway."""


SERVICE_SECTIONS = ("orchestrator", "inference", "scorer", "sandbox", "trainer", "launcher", "wandb")
"""Sections kept raw by `RunConfig` and validated by their own component (`RunConfig.section`); a
top-level name that is neither one of these nor a shared section is a typo, refused by name."""


class RunConfig(BaseModel):
    """The whole TOML file: shared sections validated here, service sections kept raw."""

    model_config = ConfigDict(extra="allow")

    run: RunSection = Field(default_factory=RunSection)
    """Identity and shape of the run."""
    bus: BusConfig = Field(default_factory=BusConfig)
    """NATS JetStream settings."""
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    """PostgreSQL ledger settings."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The policy's base model."""
    envs: list[EnvSpec] = Field(default_factory=list)
    """The environments prompts are drawn from, with mixture weights."""

    @model_validator(mode="after")
    def _known_sections(self) -> RunConfig:
        known = [*type(self).model_fields, *SERVICE_SECTIONS]
        for name in sorted(self.model_extra or {}):
            if name not in SERVICE_SECTIONS:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean [{close[0]}]?)" if close else f"; known: {', '.join(known)}"
                raise ValueError(f"unknown section [{name}]{hint}")
        return self

    def section(self, name: str, model: type[M]) -> M:
        """Validate the raw `[name]` section with the service's own model."""
        raw = (self.model_extra or {}).get(name, {})
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, prefix=name)) from None


def _describe(exc: ValidationError, *, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"]))
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        msg = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_value(text: str) -> Any:
    """A TOML literal when `text` is one (`3`, `true`, `"x"`, `[1, 2]`), else the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(f"override {dotted!r}: empty key")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(
    tree: dict[str, Any], *, sets: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    for key in sorted(k for k in environ if k.startswith(ENV_PREFIX)):
        dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
        _set_path(tree, dotted, parse_value(environ[key]))
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.]+", key.strip()):
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        _set_path(tree, key.strip(), parse_value(value.strip()))
    return tree


def load_run_config(
    path: str | Path | None = None, *, sets: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> RunConfig:
    """Read the TOML file (if any), apply env and `--set` overrides, validate the shared sections."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            tree = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    apply_overrides(tree, sets=sets, environ=environ)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def resolved_dump(config: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data for the ledger, with credentials in URLs masked."""
    data = config.model_dump(mode="json")
    for section, key in (("bus", "nats_url"), ("ledger", "database_url")):
        data[section][key] = mask_url(data[section][key])
    return data


_USERINFO = re.compile(r"//([^/@\s]*)@")
_SECRET_PARAM = re.compile(r"(?i)\b((?:ssl)?password|passwd|pass|token|secret)=[^&\s]*")


def mask_url(text: str) -> str:
    """`text` (a URL, or a message that may quote one) with its credentials masked: a password in
    the user info (`//user:***@`), user info that is a secret on its own (a NATS token:
    `nats://***@host`), and secret query parameters (`?password=***`)."""

    def userinfo(m: re.Match[str]) -> str:
        user, colon, _ = m.group(1).partition(":")
        return f"//{user}:***@" if colon else "//***@"

    return _SECRET_PARAM.sub(r"\1=***", _USERINFO.sub(userinfo, text))
