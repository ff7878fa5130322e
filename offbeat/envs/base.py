"""The environment API: a prompt source plus a rubric, and the types both sides share.

An `Environment` yields `Example`s for a split (`train` or `eval`) deterministically from a seed,
finds an example again from its `key` (the scorer only receives the key of the prompt it scores),
and scores a completion into a `Reward`: a `total`, named `components` and a `status`, so a
failure to score (no answer found, sandbox down, timeout) is data and never a silent zero.
`score_group` is the hook for rewards that need the whole group (default: score each alone).
`setup` hands an environment what it needs from the running service (a NATS connection for the
sandbox) before the first `score`.

Not covered: which environments exist (`offbeat.envs.load`), tokenisation (the scorer decodes),
and how rewards become advantages (the trainer).
"""

from __future__ import annotations

import asyncio
import enum
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

from offbeat.v1 import rollout_pb2

Split = Literal["train", "eval"]
SPLITS: tuple[Split, ...] = ("train", "eval")
Prompt = str | list[dict[str, str]]
"""A prompt is plain text or chat messages (`[{"role": "user", "content": "..."}]`)."""


class RewardStatus(enum.Enum):
    """How scoring went; each maps onto the proto's `RewardStatus`. (The proto's `LOST` is not here:
    it is the orchestrator's word that a sample never reached scoring, never a score.)"""

    OK = "ok"
    """The completion was parsed and judged; the reward is meaningful."""
    PARSE_ERROR = "parse_error"
    """No answer could be extracted; the reward is what the rubric gives for none (usually 0)."""
    SANDBOX_ERROR = "sandbox_error"
    """The sandbox could not run the code (down, overloaded, broken): no judgement was made."""
    TIMEOUT = "timeout"
    """Scoring itself ran out of time (not the solution: a slow solution is judged and fails)."""
    ERROR = "error"
    """The rubric raised; the reason says why."""

    @property
    def judged(self) -> bool:
        """Whether the reward is a judgement of the completion (trainable), not an infrastructure failure."""
        return self in (RewardStatus.OK, RewardStatus.PARSE_ERROR)

    def to_proto(self) -> rollout_pb2.RewardStatus.ValueType:
        return _TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int) -> RewardStatus:
        return _FROM_PROTO[value]


_TO_PROTO: dict[RewardStatus, rollout_pb2.RewardStatus.ValueType] = {
    RewardStatus.OK: rollout_pb2.REWARD_STATUS_OK,
    RewardStatus.PARSE_ERROR: rollout_pb2.REWARD_STATUS_PARSE_ERROR,
    RewardStatus.SANDBOX_ERROR: rollout_pb2.REWARD_STATUS_SANDBOX_ERROR,
    RewardStatus.TIMEOUT: rollout_pb2.REWARD_STATUS_TIMEOUT,
    RewardStatus.ERROR: rollout_pb2.REWARD_STATUS_ERROR,
}
_FROM_PROTO = {int(v): k for k, v in _TO_PROTO.items()}


@dataclass(frozen=True)
class Example:
    """One prompt of an environment, with what is needed to score answers to it."""

    key: str
    """Stable across runs and processes: `env.get(key)` gives this example back."""
    prompt: Prompt
    """What the policy sees."""
    answer: str | None = None
    """The reference answer, when the environment has one."""
    tests: tuple[dict[str, Any], ...] = ()
    """Hidden test cases (code environments); never part of the prompt."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Anything else the rubric needs (e.g. the reasoning-gym entry)."""


@dataclass
class Reward:
    """The score of one completion."""

    total: float
    """The scalar reward the trainer uses."""
    components: dict[str, float] = field(default_factory=dict)
    """Named parts (correctness, format, tests_passed, ...), reported alongside the total."""
    status: RewardStatus = RewardStatus.OK
    """How scoring went; anything but OK/PARSE_ERROR means no judgement was made."""
    reason: str = ""
    """Why the status is not OK (or other detail), for people and the ledger."""
    answer: str | None = None
    """The answer the parser extracted, if any."""

    @classmethod
    def failed(cls, status: RewardStatus, reason: str) -> Reward:
        """A reward that is not a judgement: total 0 and a status that says so."""
        return cls(total=0.0, components={}, status=status, reason=reason)


@dataclass
class EnvContext:
    """What a running service hands its environments before they score."""

    nats: Any = None
    """A connected `nats.aio.client.Client` (for the sandbox's request/reply), or None."""
    sandbox_subject: str = "offbeat.sandbox.exec"
    """The sandbox service's request subject."""


class Environment(ABC):
    """A prompt source plus a rubric. Subclass it and register it under the entry-point group
    `offbeat.envs` (`name = "package.module:Class"` or a factory returning an Environment)."""

    name: str = ""
    """The name it was loaded under (set by `offbeat.envs.load`)."""
    group_reward: ClassVar[bool] = False
    """True when `score_group` needs the whole group (the scorer then waits for all of it)."""

    @abstractmethod
    def examples(self, split: Split = "train", seed: int = 0) -> Iterator[Example]:
        """The split's examples in an order fixed by `seed`; train and eval never overlap."""

    @abstractmethod
    def get(self, key: str) -> Example:
        """The example with this key (KeyError when there is none)."""

    @abstractmethod
    async def score(self, example: Example, completion: str) -> Reward:
        """Score one completion of `example`'s prompt."""

    async def score_group(self, example: Example, completions: Sequence[str]) -> list[Reward]:
        """Score a whole group of completions of one prompt; override for group-relative rewards."""
        return list(await asyncio.gather(*(self.score(example, c) for c in completions)))

    async def setup(self, ctx: EnvContext) -> None:  # noqa: B027 (a hook; most envs need nothing)
        """Receive the service's resources before the first `score` (default: nothing needed)."""

    async def close(self) -> None:  # noqa: B027
        """Release what `setup` acquired."""

    def describe(self) -> str:
        """One line for `offbeat env list`."""
        doc = (type(self).__doc__ or "").strip().splitlines()
        return doc[0] if doc else type(self).__name__


def validate_split(split: str) -> Split:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split  # type: ignore[return-value]


def load_rows(shipped: str, path: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL dataset: the file at `path`, else the one shipped as `offbeat/envs/data/<shipped>`."""
    text = (
        Path(path).read_text()
        if path is not None
        else resources.files("offbeat.envs").joinpath(f"data/{shipped}").read_text()
    )
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for row in rows:
        validate_split(row["split"])
    return rows
