"""The scorer service: pull completions, score them with bounded concurrency, publish the rewards.

A durable pull consumer (`scorer`) on `rollout.completion`, shared by every replica, so replicas
split the work. Completions come a pull at a time (`Bus.consume_batches`), up to `max_in_flight`
held at once and at most `max_scoring` scored at once (`Scorer.score_batch`). Each scored
completion is published on `rollout.scored` with msg id `scored:{trajectory_id}` (a redelivered
completion is deduplicated by the server) as soon as it is scored, coalesced with the others ready
then into one pipelined publish, and its completion is acked only after the server has acked that
publish. A sweeper extends the ack deadline (`in_progress`) of every completion held longer than
`keepalive_every_s`, so slow sandbox runs are not redelivered while they run. A completion naming
an unknown environment or prompt key is dead-lettered with the reason (by `Bus.consume_batches`),
and the rest of its batch is scored as usual.

Not covered: what a reward means (the environments) or what happens to it next (the trainer).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import logging
import time
from collections.abc import Sequence

from offbeat.bus import BatchPublisher, Delivery, Outcome, Publication, Received
from offbeat.envs import EnvContext
from offbeat.service import ServiceContext
from offbeat.v1 import rollout_pb2
from offbeat_scorer.config import ScorerConfig
from offbeat_scorer.scoring import Scorer

log = logging.getLogger("offbeat.scorer")


class Settled:
    """The outcomes of one batch's completions; `wait()` returns once every published one is acked."""

    def __init__(self, outcomes: list[Outcome]) -> None:
        self.outcomes = outcomes
        self.publishing = 0
        self._done: asyncio.Future[None] | None = None

    def published(self, index: int, error: BaseException | None) -> None:
        if error is not None:
            self.outcomes[index] = error
        self.publishing -= 1
        if self.publishing == 0 and self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def wait(self) -> list[Outcome]:
        if self.publishing:
            self._done = asyncio.get_running_loop().create_future()
            await self._done
        return self.outcomes


class Keepalive:
    """Batches being handled; one task extends the ack deadline of those held too long."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.held: dict[int, tuple[Sequence[Delivery], float]] = {}
        self._ids = itertools.count()

    def hold(self, deliveries: Sequence[Delivery]) -> int:
        key = next(self._ids)
        self.held[key] = (deliveries, time.monotonic())
        return key

    def release(self, key: int) -> None:
        self.held.pop(key, None)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.every_s / 2)
            now = time.monotonic()
            for key, (deliveries, since) in list(self.held.items()):
                if now - since < self.every_s:
                    continue
                for delivery in deliveries:
                    if not delivery.acked:
                        with contextlib.suppress(Exception):  # a closed connection: redelivery will follow
                            await delivery.in_progress()
                if key in self.held:
                    self.held[key] = (deliveries, now)


async def serve(ctx: ServiceContext[ScorerConfig]) -> None:
    config, run, bus = ctx.config, ctx.run, ctx.bus
    scorer = Scorer.with_tokenizer(config, run.envs, config.tokenizer_path or run.model.path)
    await scorer.setup(
        EnvContext(nats=bus.nc, sandbox_subject=config.sandbox_subject or bus.subjects.sandbox_exec)
    )
    keepalive = Keepalive(min(config.keepalive_every_s, run.bus.ack_wait_s / 3))
    publisher = BatchPublisher(bus, max_batch=config.publish_batch)
    subject = bus.subjects.rollout_scored

    async def handle(batch: list[Received[rollout_pb2.RolloutCompletion]]) -> list[Outcome]:
        key = keepalive.hold([r.delivery for r in batch])
        try:
            settled = Settled([None] * len(batch))
            completions = [r.message for r in batch]

            def emit(index: int, data: bytes) -> None:
                msg_id = f"scored:{completions[index].trajectory_id}"
                settled.publishing += 1
                publisher.add(
                    Publication(subject, None, msg_id, data), functools.partial(settled.published, index)
                )

            outcomes = await scorer.score_batch(completions, emit, payloads=[r.delivery.data for r in batch])
            for i, outcome in enumerate(outcomes):
                if outcome is not None:
                    settled.outcomes[i] = outcome
            return await settled.wait()
        finally:
            keepalive.release(key)

    ctx.details.update(scorer.details())
    # What imports and set-up made (tokenizer, environments, their datasets: millions of objects)
    # lives as long as the process; frozen, the cyclic GC stops walking it on every full
    # collection, which otherwise cost ~10 us per completion at full rate.
    gc.collect()
    gc.freeze()
    ka_task = asyncio.create_task(keepalive.run(ctx.stop))
    report_task = asyncio.create_task(_report(ctx, scorer))
    publish_task = asyncio.create_task(publisher.run())
    ctx.set_healthy()
    log.info("scoring", extra={"envs": sorted(scorer.envs), "max_in_flight": config.max_in_flight})
    try:
        await bus.consume_batches(
            "scorer",
            rollout_pb2.RolloutCompletion,
            handle,
            stop=ctx.stop,
            max_in_flight=config.max_in_flight,
        )
    finally:
        ctx.stop.set()
        publisher.close()  # after consume returned: every handler has had its publish answered
        await asyncio.gather(ka_task, report_task, publish_task, return_exceptions=True)
        await scorer.close()


async def _report(ctx: ServiceContext[ScorerConfig], scorer: Scorer) -> None:
    """Refresh /healthz details and the scored/s gauge every second."""
    every = 1.0
    while not ctx.stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stop.wait(), timeout=every)
        ctx.details.update(scorer.details())
