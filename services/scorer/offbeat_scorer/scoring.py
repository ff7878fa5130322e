"""Turning RolloutCompletions into ScoredTrajectories: detokenize, find the example, score.

`Scorer.score_batch` is the whole path without the bus, for a batch of completions: it looks each
prompt up by `prompt_key` in the environment named by `completion.env`, decodes the tokens with
the run's tokenizer (`skip_special_tokens=True`), runs the rubrics under
`score_timeout_s` with at most `max_scoring` at once, and hands each ScoredTrajectory on as soon as
it exists. A rubric that raises or runs out of time gives a reward whose status says so (`error`,
`timeout`), never a silent zero. Environments with a group reward are held until their group is
complete (or `group_timeout_s` passes) and scored together with `score_group`.

Rubrics run in "lanes": the batch's own task scores one completion after another, and only when a
score has to wait (a sandbox call, a group) does another lane (task) start on the next one. A cheap
CPU-bound rubric thus costs no task, future or timer per completion (those cost more than the
rubric), while slow ones overlap up to `max_scoring` as before. `score_completion` scores one.

Not covered: consuming, acking and publishing (`offbeat_scorer.service`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
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
IN_FLIGHT = Gauge("offbeat_scorer_in_flight", "Completions being scored now (sampled every second)")


@dataclass(slots=True)
class _Job:
    """One completion of a batch, ready to be scored."""

    index: int
    completion: rollout_pb2.RolloutCompletion
    env: Environment
    example: Example
    text: str


Emit = Callable[[int, bytes], None]
"""Called with (index in the batch, the serialized ScoredTrajectory) as soon as a completion is scored."""


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

    def add(self, n: int = 1) -> None:
        second = int(time.monotonic())
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += n
        else:
            self.buckets.append([second, n])
            while self.buckets[0][0] < second - self.window_s:
                self.buckets.popleft()
        self.total += n

    def rate(self) -> float:
        cut = time.monotonic() - self.window_s
        while self.buckets and self.buckets[0][0] < cut:
            self.buckets.popleft()
        return sum(count for _, count in self.buckets) / self.window_s


class Slots:
    """A FIFO limit on concurrent scoring. Unlike `asyncio.Semaphore` (whose acquire scans all
    waiters), entering with a free slot costs nothing and thousands of waiters cost O(1) each."""

    def __init__(self, n: int) -> None:
        self.size = n
        self.free = n
        self.waiters: deque[asyncio.Future[None]] = deque()

    @property
    def busy(self) -> int:
        return self.size - self.free

    def try_take(self) -> bool:
        """Take a free slot without waiting, if there is one and nobody is queued for it."""
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return True
        return False

    def release(self) -> None:
        self._release()

    async def __aenter__(self) -> None:
        if self.try_take():
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
        self,
        config: ScorerConfig,
        specs: Sequence[EnvSpec],
        decode: Callable[[Sequence[int]], str],
    ):
        self.config = config
        self.decode = decode
        self.envs: dict[str, Environment] = {}
        self.specs = {spec.name: spec for spec in specs}
        self.ctx = EnvContext()
        self.groups: dict[str, _Group] = {}
        self.meter = RateMeter(config.rate_window_s)
        self.status_counts: dict[str, int] = {}
        self._unreported: dict[tuple[str, str], int] = {}
        """Scored counts not yet added to the counters (done by `details()`, every second)."""
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
            # the fast tokenizer's own decode: what `tokenizer.decode` returns here, at a fifth of the
            # cost (one at a time: `decode_batch` is no faster for short completions, and its thread
            # pool spins on the cores nats-server and the other services need)
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
        """Decode, look up, score one completion; the ScoredTrajectory to publish."""
        got: list[bytes] = []
        [outcome] = await self.score_batch([completion], lambda _, data: got.append(data))
        if outcome is not None:
            raise outcome
        return rollout_pb2.ScoredTrajectory.FromString(got[0])

    async def score_batch(
        self,
        completions: Sequence[rollout_pb2.RolloutCompletion],
        emit: Emit,
        *,
        payloads: Sequence[bytes] | None = None,
    ) -> list[BaseException | None]:
        """Score a batch, calling `emit(i, serialized ScoredTrajectory)` for each completion as
        soon as it is scored. `payloads`, the completions as they came off the wire, spare copying
        and re-serializing them into their ScoredTrajectory. Returns one outcome per completion:
        None (emitted) or what stopped it (`Reject` for one that can never be scored: an
        environment that does not load, a prompt key it lacks)."""
        started = time.perf_counter()
        outcomes: list[BaseException | None] = [None] * len(completions)
        found: list[tuple[int, Environment, Example]] = []
        for i, completion in enumerate(completions):
            try:
                env = self.envs.get(completion.env)
                if env is None:
                    env = await self.env(completion.env)
                try:
                    example = env.get(completion.prompt_key)
                except KeyError as exc:
                    raise Reject(
                        f"{completion.env}: no prompt with key {completion.prompt_key!r} ({exc})"
                    ) from None
            except Exception as exc:
                outcomes[i] = exc
                continue
            found.append((i, env, example))
        texts = self._decode_all([completions[i].completion_token_ids for i, _, _ in found])
        jobs = deque(
            _Job(i, completions[i], env, example, text)
            for (i, env, example), text in zip(found, texts, strict=True)
        )
        # each completion's share of the batch's look-ups and decode, then its own rubric time
        share = (time.perf_counter() - started) / max(1, len(completions))
        unreported = self._unreported

        def finish(job: _Job, reward: Reward, since: float) -> None:
            completion = job.completion
            status = reward.status.value
            key = (completion.env, status)
            unreported[key] = unreported.get(key, 0) + 1
            self._metrics(key)[1].observe(share + time.perf_counter() - since)
            now = time.time()
            if completion.finished_at:
                QUEUE_SECONDS.observe(max(0.0, now - completion.finished_at))
            if payloads is None:
                data = to_scored(completion, reward, job.text, scored_at=now).SerializeToString()
            else:
                data = scored_payload(payloads[job.index], reward, job.text, scored_at=now)
            emit(job.index, data)

        await self._run_lanes(jobs, finish)
        return outcomes

    def _decode_all(self, batch: list[Sequence[int]]) -> list[str]:
        decode = self.decode
        try:
            return [decode(ids) for ids in batch]
        except Exception:  # one bad sequence: find it, rather than fail the batch
            return [self._decode_one(ids) for ids in batch]

    def _decode_one(self, ids: Sequence[int]) -> str:
        try:
            return self.decode(ids)
        except Exception as exc:
            log.warning("completion tokens do not decode: %s", exc)
            return ""

    async def _run_lanes(self, jobs: deque[_Job], finish: Callable[[_Job, Reward, float], None]) -> None:
        """Score `jobs` in this task; whenever a score waits, start another lane on the next job."""
        loop = asyncio.get_running_loop()
        lanes: set[asyncio.Task[None]] = set()
        check_due = False

        def check() -> None:  # runs only once the lane that scheduled it has had to wait
            nonlocal check_due
            check_due = False
            if jobs:
                lanes.add(loop.create_task(lane()))

        def next_job() -> _Job:
            nonlocal check_due
            job = jobs.popleft()
            if jobs and not check_due:
                check_due = True
                loop.call_soon(check)
            return job

        async def lane() -> None:
            await self._lane(next_job, jobs, finish)

        try:
            await lane()
            while lanes:
                done, _ = await asyncio.wait(lanes)
                lanes.difference_update(done)
                for task in done:
                    task.result()
        except BaseException:  # a cancelled batch: nothing more is scored for it
            jobs.clear()
            for task in lanes:
                task.cancel()
            raise

    async def _lane(
        self,
        next_job: Callable[[], _Job],
        jobs: deque[_Job],
        finish: Callable[[_Job, Reward, float], None],
    ) -> None:
        """Score jobs one after another under ONE timeout, pushed forward before each rubric call
        (to within 1% of `score_timeout_s`) instead of a new timer per completion."""
        loop = asyncio.get_running_loop()
        slots = self.slots
        limit = self.config.score_timeout_s
        slack = limit / 100
        while jobs:
            job: _Job | None = None
            since = 0.0
            try:
                async with asyncio.timeout(None) as window:
                    while jobs:
                        job = next_job()
                        since = time.perf_counter()
                        env = job.env
                        if (
                            env.group_reward
                        ):  # waits for its group without a slot; scoring the group takes one
                            window.reschedule(None)
                            reward = await self._score_in_group(env, job.example, job.completion, job.text)
                        else:
                            if not slots.try_take():  # waiting for a slot is not scoring
                                window.reschedule(None)
                                await slots.__aenter__()
                            try:
                                deadline = loop.time() + limit
                                when = window.when()
                                if when is None or deadline - when > slack:
                                    window.reschedule(deadline)
                                reward = await self._rubric(env, job.example, job.text)
                            finally:
                                slots.release()
                        finish(job, reward, since)
                        job = None
            except TimeoutError:
                if job is None:
                    raise
                finish(job, self._timed_out(), since)

    async def _rubric(self, env: Environment, example: Example, text: str) -> Reward:
        try:
            return await env.score(example, text)
        except TimeoutError:
            return self._timed_out()
        except Exception as exc:  # a rubric bug must not crash the scorer; its reward says what broke
            log.exception("rubric failed")
            return Reward.failed(RewardStatus.ERROR, f"{type(exc).__name__}: {exc}")

    def _timed_out(self) -> Reward:
        return Reward.failed(RewardStatus.TIMEOUT, f"scoring took over {self.config.score_timeout_s}s")

    def _metrics(self, key: tuple[str, str]) -> tuple[Any, Any]:
        children = self._children.get(key)
        if children is None:
            env, status = key
            children = self._children[key] = (SCORED.labels(env, status), SCORE_SECONDS.labels(env))
        return children

    def _report_counts(self) -> None:
        """Add what was scored since the last call to the counters, the rate meter and /healthz."""
        for key, n in self._unreported.items():
            self._metrics(key)[0].inc(n)
            self.meter.add(n)
            self.status_counts[key[1]] = self.status_counts.get(key[1], 0) + n
        self._unreported.clear()  # in place: batches being scored hold this very dict

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
        """Score the group's members together and resolve `group.done`, whatever happens: members
        in other batches wait on it with no timer of their own."""
        if self.groups.get(key) is not group or group.done.done():
            return
        del self.groups[key]
        ids = list(group.texts)
        texts = [group.texts[i] for i in ids]
        rewards: list[Reward] | None = None
        try:
            try:
                async with self.slots, asyncio.timeout(self.config.score_timeout_s):
                    got = await env.score_group(group.example, texts)
                if not isinstance(got, Sequence) or len(got) != len(ids):
                    raise TypeError(f"score_group gave {type(got).__name__} for {len(ids)} completions")
                if not all(isinstance(r, Reward) for r in got):
                    raise TypeError("score_group gave something that is not a Reward")
                rewards = list(got)
            except TimeoutError:
                rewards = [Reward.failed(RewardStatus.TIMEOUT, "group scoring timed out") for _ in ids]
            except Exception as exc:  # as in _rubric: a rubric bug must not crash the scorer
                log.exception("group rubric failed")
                rewards = [Reward.failed(RewardStatus.ERROR, f"{type(exc).__name__}: {exc}") for _ in ids]
            if len(ids) < group.size:
                partial = f"partial group {len(ids)}/{group.size}"
                rewards = [
                    replace(r, reason=f"{r.reason}; {partial}" if r.reason else partial) for r in rewards
                ]
        finally:
            if rewards is None:  # cancelled: the members waiting elsewhere are answered, not left hanging
                rewards = [Reward.failed(RewardStatus.ERROR, "group scoring was cancelled") for _ in ids]
            group.done.set_result(dict(zip(ids, rewards, strict=True)))

    def details(self) -> dict[str, Any]:
        """Numbers for /healthz: scored/s, totals by status, environments loaded (and the counters
        brought up to date: call it every second or so)."""
        self._report_counts()
        rate = self.meter.rate()
        SCORED_PER_S.set(rate)
        IN_FLIGHT.set(self.slots.busy)
        return {
            "scored_per_s": round(rate, 2),
            "scored_total": self.meter.total,
            "status_counts": dict(self.status_counts),
            "envs": sorted(self.envs),
            "groups_waiting": len(self.groups),
        }


def scored_payload(completion: bytes, reward: Reward, text: str, *, scored_at: float) -> bytes:
    """The serialized ScoredTrajectory of a completion given serialized: field 1 (`completion`)
    written around the bytes as they are, then the other fields. The same message `to_scored`
    gives, without copying the completion into it and serializing it again."""
    rest = rollout_pb2.ScoredTrajectory(
        reward=reward.total,
        components=reward.components,
        status=reward.status.to_proto(),
        status_reason=reward.reason,
        scored_at=scored_at,
        completion_text=text,
    ).SerializeToString()
    return _COMPLETION_TAG + _varint(len(completion)) + completion + rest


_COMPLETION_TAG = bytes([1 << 3 | 2])  # field 1, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


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
