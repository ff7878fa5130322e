"""The scorer service: pull completions, score them with bounded concurrency, publish the rewards.

A durable pull consumer (`scorer`) on `rollout.completion`, shared by every replica, so replicas
split the work. Up to `max_in_flight` completions are scored at once. Each scored completion is
published on `rollout.scored` with msg id `scored:{trajectory_id}` (a redelivered completion is
deduplicated by the server) and only then acked. A sweeper extends the ack deadline
(`in_progress`) of every completion held longer than `keepalive_every_s`, so slow sandbox runs
are not redelivered while they run. A completion naming an unknown environment or prompt key is
dead-lettered with the reason (by `Bus.consume`).

Not covered: what a reward means (the environments) or what happens to it next (the trainer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from offbeat.bus import Bus, Delivery, Publication
from offbeat.envs import EnvContext
from offbeat.service import ServiceContext
from offbeat.v1 import rollout_pb2
from offbeat_scorer.config import ScorerConfig
from offbeat_scorer.scoring import Scorer

log = logging.getLogger("offbeat.scorer")


class BatchPublisher:
    """Coalesces the handlers' publishes into pipelined batches (`Bus.publish_many`).

    `publish` returns once the server has acked that message (so the completion is acked only
    after its score is stored); many handlers waiting at once share one round of acks.
    """

    def __init__(self, bus: Bus, *, max_batch: int) -> None:
        self.bus = bus
        self.max_batch = max_batch
        self.pending: list[tuple[Publication[rollout_pb2.ScoredTrajectory], asyncio.Future[None]]] = []
        self.wakeup = asyncio.Event()
        self.closing = False

    async def publish(self, subject: str, message: rollout_pb2.ScoredTrajectory, *, msg_id: str) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((Publication(subject, message, msg_id), done))
        self.wakeup.set()
        await done

    async def run(self) -> None:
        """Publish until `close()`; whatever is pending then is still published."""
        while not (self.closing and not self.pending):
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.pending:
                batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
                try:
                    await self.bus.publish_many(p for p, _ in batch)
                except Exception as exc:  # every handler of the batch fails: nak, redelivery, dedup
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                else:
                    for _, done in batch:
                        if not done.done():
                            done.set_result(None)

    def close(self) -> None:
        self.closing = True
        self.wakeup.set()


class Keepalive:
    """Deliveries being handled; one task extends the ack deadline of those held too long."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.held: dict[Delivery, float] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.every_s / 2)
            now = time.monotonic()
            for delivery, since in list(self.held.items()):
                if now - since >= self.every_s and not delivery.acked:
                    with contextlib.suppress(Exception):  # a closed connection: redelivery will follow
                        await delivery.in_progress()
                    self.held[delivery] = now


async def serve(ctx: ServiceContext[ScorerConfig]) -> None:
    config, run, bus = ctx.config, ctx.run, ctx.bus
    scorer = Scorer.with_tokenizer(config, run.envs, config.tokenizer_path or run.model.path)
    await scorer.setup(
        EnvContext(nats=bus.nc, sandbox_subject=config.sandbox_subject or bus.subjects.sandbox_exec)
    )
    keepalive = Keepalive(min(config.keepalive_every_s, run.bus.ack_wait_s / 3))
    publisher = BatchPublisher(bus, max_batch=config.publish_batch)
    subject = bus.subjects.rollout_scored

    async def handle(completion: rollout_pb2.RolloutCompletion, delivery: Delivery) -> None:
        keepalive.held[delivery] = time.monotonic()
        try:
            scored = await scorer.score_completion(completion)
            await publisher.publish(subject, scored, msg_id=f"scored:{completion.trajectory_id}")
        finally:
            keepalive.held.pop(delivery, None)

    ctx.details.update(scorer.details())
    ka_task = asyncio.create_task(keepalive.run(ctx.stop))
    report_task = asyncio.create_task(_report(ctx, scorer))
    publish_task = asyncio.create_task(publisher.run())
    ctx.set_healthy()
    log.info("scoring", extra={"envs": sorted(scorer.envs), "max_in_flight": config.max_in_flight})
    try:
        await bus.consume(
            "scorer", rollout_pb2.RolloutCompletion, handle, stop=ctx.stop, max_in_flight=config.max_in_flight
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
