"""Turning one RolloutCompletion into one ScoredTrajectory: detokenize, find the example, score.

`Scorer.score_completion` is the whole per-message path without the bus: it decodes the completion
tokens with the run's tokenizer (`skip_special_tokens=True`), looks the prompt up by `prompt_key`
in the environment named by `completion.env`, runs the rubric under `score_timeout_s`, and builds
the ScoredTrajectory. A rubric that raises or runs out of time gives a reward whose status says so
(`error`, `timeout`), never a silent zero. Environments with a group reward are held until their
group is complete (or `group_timeout_s` passes) and scored together with `score_group`.

Not covered: consuming, acking and publishing (`offbeat_scorer.service`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from offbeat.bus import Reject
from offbeat.config import EnvSpec
from offbeat.envs import EnvContext, Environment, Example, Reward, RewardStatus
from offbeat.envs import load as load_env
from offbeat.v1 import rollout_pb2
from offbeat_scorer.config import ScorerConfig

log = logging.getLogger("offbeat.scorer")

SCORED = Counter("offbeat_scorer_scored_total", "Completions scored", ["env", "status"])
SCORE_SECONDS = Histogram(
    "offbeat_scorer_score_seconds",
    "Time to score one completion (decode + rubric)",
    ["env"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
)
QUEUE_SECONDS = Histogram(
    "offbeat_scorer_queue_seconds",
    "Time from the completion's finish to its score",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600),
)
SCORED_PER_S = Gauge("offbeat_scorer_scored_per_s", "Completions scored per second (recent window)")
IN_FLIGHT = Gauge("offbeat_scorer_in_flight", "Completions being scored now")


@dataclass
class _Group:
    """Members of one group held for a group reward; `done` resolves with their rewards."""

    example: Example
    size: int
    texts: dict[str, str] = field(default_factory=dict)
    done: asyncio.Future[dict[str, Reward]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class RateMeter:
    """Events per second over a sliding window (per-second buckets), for the gauge and /healthz."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.buckets: deque[list[int]] = deque()  # [second, count]
        self.total = 0

    def add(self) -> None:
        second = int(time.monotonic())
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += 1
        else:
            self.buckets.append([second, 1])
            while self.buckets[0][0] < second - self.window_s:
                self.buckets.popleft()
        self.total += 1

    def rate(self) -> float:
        cut = time.monotonic() - self.window_s
        while self.buckets and self.buckets[0][0] < cut:
            self.buckets.popleft()
        return sum(count for _, count in self.buckets) / self.window_s


class Slots:
    """A FIFO limit on concurrent scoring. Unlike `asyncio.Semaphore` (whose acquire scans all
    waiters), entering with a free slot costs nothing and thousands of waiters cost O(1) each."""

    def __init__(self, n: int) -> None:
        self.free = n
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():  # handed a slot, then cancelled: pass it on
                self._release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        while self.waiters:
            slot = self.waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot goes straight to the next waiter
                return
        self.free += 1


class Scorer:
    """The environments of a run, the tokenizer, and the scoring of single completions."""

    def __init__(
        self, config: ScorerConfig, specs: Sequence[EnvSpec], decode: Callable[[Sequence[int]], str]
    ):
        self.config = config
        self.decode = decode
        self.envs: dict[str, Environment] = {}
        self.specs = {spec.name: spec for spec in specs}
        self.ctx = EnvContext()
        self.groups: dict[str, _Group] = {}
        self.meter = RateMeter(config.rate_window_s)
        self.status_counts: dict[str, int] = {}
        self.slots = Slots(config.max_scoring)
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._loading = asyncio.Lock()

    @classmethod
    def with_tokenizer(cls, config: ScorerConfig, specs: Sequence[EnvSpec], tokenizer_path: str) -> Scorer:
        """A scorer that decodes with `AutoTokenizer.from_pretrained(tokenizer_path)`."""
        from transformers import AutoTokenizer

        if not tokenizer_path:
            raise ValueError("no tokenizer: set [model] path (or [scorer] tokenizer_path)")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            # the fast tokenizer's own decode: what `tokenizer.decode` returns here, at a fifth of the cost
            def decode(ids: Sequence[int]) -> str:
                return str(backend.decode(list(ids), skip_special_tokens=True))
        else:

            def decode(ids: Sequence[int]) -> str:
                return str(tokenizer.decode(list(ids), skip_special_tokens=True))

        return cls(config, specs, decode)

    async def setup(self, ctx: EnvContext) -> None:
        """Load every configured environment and hand it the service's resources."""
        self.ctx = ctx
        for name in self.specs:
            await self.env(name)

    async def close(self) -> None:
        for env in self.envs.values():
            await env.close()

    async def env(self, name: str) -> Environment:
        """The environment named in a completion; ones not in `[[envs]]` load with default args.
        A name that does not load is a message that can never be scored: dead-lettered."""
        env = self.envs.get(name)
        if env is not None:
            return env
        async with self._loading:  # one load (and one setup) per environment
            env = self.envs.get(name)
            if env is None:
                spec = self.specs.get(name)
                try:
                    env = load_env(name, **(spec.args if spec else {}))
                except (KeyError, ValueError, TypeError, ImportError) as exc:
                    raise Reject(f"environment {name!r} does not load: {type(exc).__name__}: {exc}") from None
                await env.setup(self.ctx)
                self.envs[name] = env
        return env

    async def score_completion(
        self, completion: rollout_pb2.RolloutCompletion
    ) -> rollout_pb2.ScoredTrajectory:
        """Decode, look up, score; the ScoredTrajectory to publish."""
        started = time.perf_counter()
        env = await self.env(completion.env)
        try:
            example = env.get(completion.prompt_key)
        except KeyError as exc:
            raise Reject(f"{completion.env}: no prompt with key {completion.prompt_key!r} ({exc})") from None
        text = self.decode(completion.completion_token_ids)
        if env.group_reward:  # waits for its group without a slot; scoring the group takes one
            reward = await self._score_in_group(env, example, completion, text)
        else:
            async with self.slots:
                IN_FLIGHT.inc()
                try:
                    reward = await self._guarded(env.score(example, text))
                finally:
                    IN_FLIGHT.dec()
        status = reward.status.value
        scored, seconds = self._metrics(completion.env, status)
        scored.inc()
        seconds.observe(time.perf_counter() - started)
        now = time.time()
        if completion.finished_at:
            QUEUE_SECONDS.observe(max(0.0, now - completion.finished_at))
        self.meter.add()
        self.status_counts[status] = self.status_counts.get(status, 0) + 1
        return to_scored(completion, reward, text, scored_at=now)

    def _metrics(self, env: str, status: str) -> tuple[Any, Any]:
        key = (env, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (SCORED.labels(env, status), SCORE_SECONDS.labels(env))
        return children

    async def _guarded(self, work: Any) -> Reward:
        try:
            async with asyncio.timeout(self.config.score_timeout_s):
                return await work  # type: ignore[no-any-return]
        except TimeoutError:
            return Reward.failed(RewardStatus.TIMEOUT, f"scoring took over {self.config.score_timeout_s}s")
        except Exception as exc:  # a rubric bug must not crash the scorer; its reward says what broke
            log.exception("rubric failed")
            return Reward.failed(RewardStatus.ERROR, f"{type(exc).__name__}: {exc}")

    async def _score_in_group(
        self, env: Environment, example: Example, completion: rollout_pb2.RolloutCompletion, text: str
    ) -> Reward:
        key = f"{completion.env}/{completion.group_id}"
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Group(example, max(1, completion.group_size))
        group.texts[completion.trajectory_id] = text
        if len(group.texts) >= group.size:
            await self._finish_group(env, key, group)
        else:
            done, _ = await asyncio.wait({group.done}, timeout=self.config.group_timeout_s)
            if not done:
                await self._finish_group(env, key, group)
        return (await group.done)[completion.trajectory_id]

    async def _finish_group(self, env: Environment, key: str, group: _Group) -> None:
        if self.groups.get(key) is not group or group.done.done():
            return
        del self.groups[key]
        ids = list(group.texts)
        texts = [group.texts[i] for i in ids]
        try:
            async with self.slots, asyncio.timeout(self.config.score_timeout_s):
                rewards = await env.score_group(group.example, texts)
        except TimeoutError:
            rewards = [Reward.failed(RewardStatus.TIMEOUT, "group scoring timed out")] * len(ids)
        except Exception as exc:  # as in _guarded
            log.exception("group rubric failed")
            rewards = [Reward.failed(RewardStatus.ERROR, f"{type(exc).__name__}: {exc}")] * len(ids)
        if len(ids) < group.size:
            for r in rewards:
                r.reason = (r.reason + "; " if r.reason else "") + f"partial group {len(ids)}/{group.size}"
        group.done.set_result(dict(zip(ids, rewards, strict=True)))

    def details(self) -> dict[str, Any]:
        """Numbers for /healthz: scored/s, totals by status, environments loaded."""
        rate = self.meter.rate()
        SCORED_PER_S.set(rate)
        return {
            "scored_per_s": round(rate, 2),
            "scored_total": self.meter.total,
            "status_counts": dict(self.status_counts),
            "envs": sorted(self.envs),
            "groups_waiting": len(self.groups),
        }


def to_scored(
    completion: rollout_pb2.RolloutCompletion, reward: Reward, text: str, *, scored_at: float
) -> rollout_pb2.ScoredTrajectory:
    return rollout_pb2.ScoredTrajectory(
        completion=completion,
        reward=reward.total,
        components=reward.components,
        status=reward.status.to_proto(),
        status_reason=reward.reason,
        scored_at=scored_at,
        completion_text=text,
    )
