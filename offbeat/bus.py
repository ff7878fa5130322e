"""The message bus: every stream, consumer and subject of a run, declared in one place.

One JetStream stream per run holds all of the run's subjects (`<prefix>.<run>.>`) with interest
retention: a message stays until every durable consumer whose filter matches it has acked it.
All durable consumers are declared here and created by `Bus.ensure()` (idempotent, called by every
service at start), so no message is published before the consumers that must see it exist.

- Publishing that matters goes through JetStream with a `Nats-Msg-Id` (server-side dedup).
- `Bus.consume` is the pull loop every service uses: batched fetch, handler, ack; a handler that
  raises is nak'ed with a delay and, at its last delivery, dead-lettered with the error; a payload
  that does not parse (or names another run) is dead-lettered and terminated at once.
- `Bus.consume_batches` is the same loop for handlers that take a whole pull at once (the scorer,
  the ledger writer): per-message costs are paid once per batch, and the handler says per message
  whether it succeeded, so one bad message is dead-lettered or nak'ed alone and the rest acked.
- `Bus.publish_many` pipelines a batch of publishes and waits for their acks together;
  `BatchPublisher` coalesces the publishes of many tasks into such batches.
- A message delivered `max_deliver` times without an answer (its consumer's process died or hung
  every time: a poison message) is never delivered again, and the server says so only in an
  advisory. A second stream keeps the run's advisories, and `Bus.dead_letter_undelivered` (run by
  the orchestrator) turns each into a dead letter with the message and the reason, so such a
  message is accounted for like one a handler refused instead of silently going nowhere.
- Fan-out subjects (policy.weights, control) are also read by plain subscriptions in every replica,
  and the policy head and paused flag live in the run's KV bucket for services that start late.

Not covered: what a message means. Handlers are idempotent by the ids each message carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from prometheus_client import Counter, Histogram

from offbeat.config import BusConfig, mask_url
from offbeat.jetstream import PubAcks, Puller, ack_info
from offbeat.jetstream import PublishError as PublishError
from offbeat.v1 import policy_pb2

log = logging.getLogger("offbeat.bus")

T = TypeVar("T", bound=Message)
R = TypeVar("R", bound=Message)
M = TypeVar("M")

SANDBOX_EXEC: Final = "sandbox.exec"
HEAD_KEY: Final = "policy.head"
PAUSED_KEY: Final = "control.paused"
NO_STORAGE_ERR_CODE: Final = 10047
"""JetStream's "insufficient storage resources": a stream's max_bytes does not fit the server's store."""


class BusConfigError(RuntimeError):
    """The server does not fit the run's bus config (a smaller max_payload) or refused its declared
    stream, consumers or bucket; the message says why."""


PUBLISHED = Counter("offbeat_bus_published_total", "Messages published through JetStream", ["kind"])
HANDLED = Counter("offbeat_bus_handled_total", "Messages handled by a consumer", ["consumer", "outcome"])
HANDLE_SECONDS = Histogram(
    "offbeat_bus_handle_seconds",
    "Handler time per message (batch consumers: one observation per batch, its time per message)",
    ["consumer"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
)


class Subjects:
    """Subject names of one run: `<prefix>.<run>.<kind>`."""

    KINDS: Final = (
        "rollout.request",
        "rollout.completion",
        "rollout.scored",
        "policy.weights",
        "policy.live",
        "trainer.step",
        "control",
        "dlq",
    )

    def __init__(self, prefix: str, run_id: str) -> None:
        if run_id == SANDBOX_EXEC.split(".")[0]:
            raise ValueError(
                f"run id {run_id!r} is reserved: its stream would capture {prefix}.{SANDBOX_EXEC}"
            )
        self.prefix = prefix
        self.run_id = run_id
        self.root = f"{prefix}.{run_id}"
        self.rollout_request = f"{self.root}.rollout.request"
        self.rollout_completion = f"{self.root}.rollout.completion"
        self.rollout_scored = f"{self.root}.rollout.scored"
        self.policy_weights = f"{self.root}.policy.weights"
        self.policy_live = f"{self.root}.policy.live"
        self.trainer_step = f"{self.root}.trainer.step"
        self.dlq = f"{self.root}.dlq"
        self.all = f"{self.root}.>"
        self.control_all = f"{self.root}.control.*"
        self.sandbox_exec = f"{prefix}.{SANDBOX_EXEC}"
        self.stream = f"OFFBEAT_{prefix}_{run_id}".replace("-", "_").upper()
        self.advisory_stream = f"{self.stream}_ADVISORIES"
        self.max_deliveries = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.*"
        """The server's advisories about the run's messages that ran out of deliveries."""
        self.kv_bucket = f"offbeat_{prefix}_{run_id}".replace("-", "_")

    def control(self, command: str) -> str:
        return f"{self.root}.control.{command}"

    def kind(self, subject: str) -> str:
        """The kind part of one of our subjects (`rollout.request`), for metrics and logs."""
        return subject[len(self.root) + 1 :] if subject.startswith(self.root + ".") else subject


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer; every limit explicit."""

    durable: str
    filter_subject: str
    ack_wait_s: float
    max_deliver: int
    max_ack_pending: int
    description: str
    stream: str = ""
    """The stream it reads; empty: the run's stream."""


def consumer_specs(cfg: BusConfig, subjects: Subjects) -> dict[str, ConsumerSpec]:
    """The run's durable consumers: one per service queue, and the ledger's view of everything."""

    def spec(name: str, subject: str, what: str, *, max_ack_pending: int | None = None) -> ConsumerSpec:
        return ConsumerSpec(
            durable=name,
            filter_subject=subject,
            ack_wait_s=cfg.ack_wait_s,
            max_deliver=cfg.max_deliver,
            max_ack_pending=max_ack_pending or cfg.max_ack_pending,
            description=what,
        )

    return {
        "inference": spec(
            "inference", subjects.rollout_request, "rollout requests for the inference replicas"
        ),
        "scorer": spec("scorer", subjects.rollout_completion, "completions for the scorer replicas"),
        "trainer": spec(
            "trainer",
            subjects.rollout_scored,
            "scored trajectories for the trainer",
            max_ack_pending=max(cfg.max_ack_pending, 65536),
        ),
        "ledger": spec(
            "ledger",
            subjects.all,
            "every event of the run, for the ledger writer",
            max_ack_pending=max(cfg.max_ack_pending, 65536),
        ),
        "undelivered": ConsumerSpec(
            durable="undelivered",
            filter_subject=subjects.max_deliveries,
            ack_wait_s=cfg.ack_wait_s,
            max_deliver=-1,  # what reads it must not be able to lose it the same way
            max_ack_pending=cfg.max_ack_pending,
            description="messages that ran out of deliveries, for the dead-letter queue",
            stream=subjects.advisory_stream,
        ),
    }


UNDELIVERED_KEPT: Final = 100_000
"""Advisories the advisory stream keeps (the oldest go first); each is a few hundred bytes."""


class Reject(Exception):
    """Raised by a handler for a message that can never succeed: dead-lettered at once."""


class Delivery:
    """One delivered message; a handler may `defer()` the ack and ack it later itself."""

    __slots__ = ("_info", "_msg", "acked", "deferred", "subject")

    def __init__(self, msg: Msg, num_delivered: int | None = None, stream_seq: int | None = None) -> None:
        """Without `num_delivered` and `stream_seq` they are read from the message's ack subject
        when first asked for (most messages never are)."""
        self._msg = msg
        self.subject: str = msg.subject
        self._info = None if num_delivered is None or stream_seq is None else (num_delivered, stream_seq)
        self.deferred = False
        self.acked = False

    @property
    def num_delivered(self) -> int:
        """How many times the server has delivered this message (1 the first time)."""
        if self._info is None:
            self._info = ack_info(self._msg.reply)
        return self._info[0]

    @property
    def stream_seq(self) -> int:
        if self._info is None:
            self._info = ack_info(self._msg.reply)
        return self._info[1]

    @property
    def data(self) -> bytes:
        """The raw payload (for consumers that decode by subject, like the ledger writer)."""
        return self._msg.data  # type: ignore[no-any-return]

    @property
    def msg_id(self) -> str:
        return (self._msg.headers or {}).get("Nats-Msg-Id", "")

    def defer(self) -> None:
        """The handler takes over acknowledgement (e.g. ack only once a checkpoint is durable)."""
        self.deferred = True

    async def ack(self, *, sync: bool = False, timeout_s: float = 5.0) -> None:
        if self.acked:
            return
        if sync:
            await self._msg.ack_sync(timeout=timeout_s)
        else:
            await self._msg.ack()
        self.acked = True

    async def nak(self, delay_s: float | None = None) -> None:
        await self._msg.nak(delay=delay_s)
        self.acked = True

    async def in_progress(self) -> None:
        """Extend the ack deadline of a message that takes long to handle."""
        await self._msg.in_progress()


Handler = Callable[[T, Delivery], Awaitable[None]]


@dataclass(slots=True)
class Received(Generic[M]):
    """One message of a batch handed to a batch handler."""

    message: M
    """The parsed payload (the raw bytes for a consumer without a message type)."""
    delivery: Delivery


Outcome = BaseException | None
"""What became of one message of a batch: None handled (acked unless deferred), `Reject` dead-letter
it now, any other exception nak it (dead-lettered at its last delivery)."""
BatchHandler = Callable[[list[Received[M]]], Awaitable[Sequence[Outcome] | None]]
"""Takes a batch; returns one outcome per message, in order, or None when all were handled. Raising
fails every message of the batch with that exception."""


@dataclass
class Publication(Generic[T]):
    subject: str
    message: T | None
    msg_id: str
    data: bytes | None = None
    """The message already serialized, if the publisher has it so (then `message` may be None)."""

    def payload(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.message is not None, "a publication needs a message or its bytes"
        return self.message.SerializeToString()


class Bus:
    """A connection to NATS for one run, with the run's subjects, stream, consumers and KV."""

    def __init__(self, nc: NATS, cfg: BusConfig, subjects: Subjects, name: str) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=cfg.publish_timeout_s)
        self.cfg = cfg
        self.subjects = subjects
        self.run_id = subjects.run_id
        self.name = name
        self.consumers = consumer_specs(cfg, subjects)
        self._kv: Any = None
        self._metrics: dict[str, tuple[Any, Any, Any]] = {}
        self._pub_acks: PubAcks | None = None
        self._pub_acks_lock = asyncio.Lock()

    def _consumer_metrics(self, consumer: str) -> tuple[Any, Any, Any]:
        """(ok counter, nak counter, handle-time histogram) children, looked up once per consumer."""
        found = self._metrics.get(consumer)
        if found is None:
            found = (
                HANDLED.labels(consumer, "ok"),
                HANDLED.labels(consumer, "nak"),
                HANDLE_SECONDS.labels(consumer),
            )
            self._metrics[consumer] = found
        return found

    @classmethod
    async def connect(cls, cfg: BusConfig, run_id: str, *, name: str) -> Bus:
        """Connect (retrying until `connect_timeout_s` per attempt) and reconnect forever after."""
        subjects = Subjects(cfg.prefix, run_id)

        async def on_disconnect() -> None:
            log.info("nats disconnected", extra={"service": name})

        async def on_reconnect() -> None:
            log.info("nats reconnected", extra={"service": name})

        async def on_error(exc: Exception) -> None:
            log.warning("nats error (%s): %s", mask_url(cfg.nats_url), exc, extra={"service": name})

        nc = await nats.connect(
            servers=[s.strip() for s in cfg.nats_url.split(",")],
            name=name,
            connect_timeout=cfg.connect_timeout_s,  # type: ignore[arg-type]
            reconnect_time_wait=cfg.reconnect_wait_s,  # type: ignore[arg-type]
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            pending_size=4 * cfg.max_payload_bytes,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
        )
        if nc.max_payload < cfg.max_payload_bytes:  # the stream and weight chunks are sized by the setting
            await nc.close()
            raise BusConfigError(
                f"the NATS server at {mask_url(cfg.nats_url)} allows max_payload {nc.max_payload} bytes, "
                f"less than [bus] max_payload_bytes = {cfg.max_payload_bytes}: raise the server's "
                "max_payload or lower the setting"
            )
        return cls(nc, cfg, subjects, name)

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Drain subscriptions and flush pending publishes, then close."""
        if self.nc.is_closed:
            return
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError, ConnectionError):
            await self.nc.drain()
        if not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error, ConnectionError):
                await self.nc.close()

    # --- declaration -----------------------------------------------------------------------

    def stream_config(self) -> api.StreamConfig:
        cfg = self.cfg
        return api.StreamConfig(
            name=self.subjects.stream,
            subjects=[self.subjects.all],
            retention=api.RetentionPolicy.INTEREST,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.NEW,
            max_age=cfg.stream_max_age_s,
            max_bytes=cfg.stream_max_bytes,
            max_msg_size=cfg.max_payload_bytes,
            max_msgs=-1,
            max_consumers=-1,
            duplicate_window=cfg.duplicate_window_s,
            num_replicas=cfg.stream_replicas,
        )

    def advisory_stream_config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.subjects.advisory_stream,
            subjects=[self.subjects.max_deliveries],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            max_age=self.cfg.stream_max_age_s,
            max_msgs=UNDELIVERED_KEPT,
            max_bytes=-1,  # bounded by max_msgs; reserves none of the server's store
            num_replicas=self.cfg.stream_replicas,
        )

    def stream_of(self, consumer: str) -> str:
        return self.consumers[consumer].stream or self.subjects.stream

    async def delete_streams(self) -> None:
        """Delete the run's streams (messages, consumers and advisories); missing ones are fine."""
        for name in (self.subjects.stream, self.subjects.advisory_stream):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_stream(name)

    async def _add_or_update_stream(self, config: api.StreamConfig) -> None:
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError:  # exists with another configuration
            await self.js.update_stream(config)

    async def ensure(self) -> None:
        """Create (or update to the declared config) the streams, every consumer and the KV bucket."""
        config = self.stream_config()
        try:
            await self._add_or_update_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code != NO_STORAGE_ERR_CODE:
                raise
            raise BusConfigError(
                f"JetStream has no room for stream {config.name}: each run reserves [bus] "
                f"stream_max_bytes = {config.max_bytes} bytes of the server's file store. Lower "
                "stream_max_bytes, free disk space, or delete old runs' streams "
                "(`offbeat run OLD.toml --fresh` forgets one)"
            ) from None
        await self._add_or_update_stream(self.advisory_stream_config())
        for name, spec in self.consumers.items():
            await self.js.add_consumer(
                self.stream_of(name),
                api.ConsumerConfig(
                    durable_name=spec.durable,
                    description=spec.description,
                    filter_subject=spec.filter_subject,
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=spec.ack_wait_s,
                    max_deliver=spec.max_deliver,
                    max_ack_pending=spec.max_ack_pending,
                    max_waiting=512,
                    replay_policy=api.ReplayPolicy.INSTANT,
                    inactive_threshold=None,
                ),
            )
        self._kv = await self.js.create_key_value(
            bucket=self.subjects.kv_bucket,
            history=self.cfg.kv_history,
            description=f"offbeat run {self.run_id}",
            replicas=self.cfg.stream_replicas,
        )

    # --- publish ---------------------------------------------------------------------------

    async def publish(self, subject: str, message: Message, *, msg_id: str) -> api.PubAck:
        """JetStream publish with dedup id; returns the server's ack (`duplicate` set on repeats)."""
        ack = await self.js.publish(subject, message.SerializeToString(), headers={"Nats-Msg-Id": msg_id})
        PUBLISHED.labels(self.subjects.kind(subject)).inc()
        return ack

    async def publish_many(self, items: Iterable[Publication[Any]]) -> int:
        """Pipelined JetStream publishes with dedup ids, their acks awaited together; returns the
        number the server found duplicate. Raises `PublishError` (naming the refused ones by index)
        if any was refused, TimeoutError if the acks took over `publish_timeout_s`."""
        triples = []
        counts: dict[str, int] = {}
        for item in items:
            triples.append((item.subject, item.payload(), item.msg_id))
            counts[item.subject] = counts.get(item.subject, 0) + 1
        if not triples:
            return 0
        duplicates = await (await self._acks()).publish(triples, timeout_s=self.cfg.publish_timeout_s)
        for subject, n in counts.items():
            PUBLISHED.labels(self.subjects.kind(subject)).inc(n)
        return duplicates

    async def _acks(self) -> PubAcks:
        if self._pub_acks is None:
            async with self._pub_acks_lock:
                if self._pub_acks is None:
                    self._pub_acks = await PubAcks(self.nc).start()
        return self._pub_acks

    async def control(
        self, kind: policy_pb2.ControlKind.ValueType, *, command_id: str, version: int = 0, reason: str = ""
    ) -> None:
        """Publish a control command (pause, resume, rollback, stop) and record pause state in KV."""
        cmd = policy_pb2.ControlCommand(
            run_id=self.run_id,
            command_id=command_id,
            kind=kind,
            version=version,
            reason=reason,  # type: ignore[arg-type]
            issued_at=time.time(),
        )
        name = policy_pb2.ControlKind.Name(kind).removeprefix("CONTROL_KIND_").lower()
        if kind in (policy_pb2.CONTROL_KIND_PAUSE, policy_pb2.CONTROL_KIND_RESUME):
            await self.kv_put(PAUSED_KEY, b"1" if kind == policy_pb2.CONTROL_KIND_PAUSE else b"0")
        await self.publish(self.subjects.control(name), cmd, msg_id=f"control:{command_id}")

    # --- consume ---------------------------------------------------------------------------

    async def _pull(self, consumer: str) -> JetStreamContext.PullSubscription:
        spec = self.consumers[consumer]
        return await self.js.pull_subscribe_bind(
            durable=spec.durable,
            stream=self.stream_of(consumer),
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )

    async def consume(
        self,
        consumer: str,
        message_type: type[T],
        handler: Handler[T],
        *,
        stop: asyncio.Event,
        max_in_flight: int = 1,
        batch: int | None = None,
    ) -> None:
        """Pull from a declared consumer until `stop` is set.

        With `max_in_flight == 1` messages are handled one after another in fetch order; above it,
        each message is handled in its own task and no more than `max_in_flight` are held at once
        (the engine's capacity, for inference). On stop, handlers in flight are awaited.
        """
        size = batch or self.cfg.fetch_batch
        tasks: set[asyncio.Task[None]] = set()

        def room() -> int:
            return size if max_in_flight == 1 else max_in_flight - len(tasks)

        async def take(msgs: list[Msg]) -> None:
            for msg in msgs:
                if max_in_flight == 1:
                    await self._handle(consumer, message_type, handler, msg)
                else:
                    task = asyncio.create_task(self._handle(consumer, message_type, handler, msg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

        await self._pull_loop(consumer, stop=stop, room=room, size=size, depth=1, busy=tasks, take=take)

    async def consume_batches(
        self,
        consumer: str,
        message_type: type[T] | None,
        handler: BatchHandler[Any],
        *,
        stop: asyncio.Event,
        max_in_flight: int | None = None,
        batch: int | None = None,
    ) -> None:
        """Pull from a declared consumer until `stop` is set, handing `handler` every pull at once.

        Each message is parsed as `message_type` (None: handed over as raw bytes, for consumers
        that parse by subject) and checked to name this run; one that fails is dead-lettered with
        the reason on its own, exactly as `consume` does, and the rest of the batch goes on. After
        the handler returns, each message is acked, nak'ed or dead-lettered by its outcome (see
        `BatchHandler`); a deferred one is left to the handler. Without `max_in_flight` batches
        are handled one after another; with it, each batch runs in its own task and no more than
        `max_in_flight` messages are held at once. Either way the next pull is asked for while a
        batch is handled. On stop, batches in flight are awaited.
        """
        size = batch or self.cfg.fetch_batch
        tasks: set[asyncio.Task[None]] = set()
        held = 0

        def room() -> int:  # sequential: this batch and the next one on its way
            return 2 * size if max_in_flight is None else max_in_flight - held

        async def run(msgs: list[Msg]) -> None:
            nonlocal held
            try:
                await self._handle_batch(consumer, message_type, handler, msgs)
            finally:
                held -= len(msgs)

        async def take(msgs: list[Msg]) -> None:
            nonlocal held
            if max_in_flight is None:
                await self._handle_batch(consumer, message_type, handler, msgs)
                return
            held += len(msgs)
            task = asyncio.create_task(run(msgs))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        await self._pull_loop(consumer, stop=stop, room=room, size=size, depth=2, busy=tasks, take=take)

    async def _pull_loop(
        self,
        consumer: str,
        *,
        stop: asyncio.Event,
        room: Callable[[], int],
        size: int,
        depth: int,
        busy: set[asyncio.Task[None]],
        take: Callable[[list[Msg]], Awaitable[None]],
    ) -> None:
        """Fetch up to `size` messages at a time (no more outstanding than `room()` allows, in up
        to `depth` pull requests) and `take` them, until `stop`; then await `busy`."""
        durable = self.consumers[consumer].durable
        puller = await Puller(self.nc, self.stream_of(consumer), durable, depth=depth).start()
        try:
            while not stop.is_set():
                want = room()
                if want <= 0:
                    if busy:
                        await asyncio.wait(
                            busy, return_when=asyncio.FIRST_COMPLETED, timeout=self.cfg.fetch_timeout_s
                        )
                    continue
                try:
                    msgs = await puller.fetch(want, self.cfg.fetch_timeout_s, size=size)
                except nats.errors.ConnectionClosedError:
                    if stop.is_set() or self.nc.is_closed:
                        break
                    raise
                except (nats.errors.Error, nats.js.errors.Error) as exc:
                    log.warning("fetch on %s failed (%s); retrying", consumer, exc)
                    await asyncio.sleep(self.cfg.reconnect_wait_s)
                    continue
                if msgs:
                    await take(msgs)
        finally:
            if busy:
                await asyncio.gather(*busy, return_exceptions=True)
            await puller.close()

    async def _handle(self, consumer: str, message_type: type[T], handler: Handler[T], msg: Msg) -> None:
        delivery = Delivery(msg)
        ok_count, nak_count, handle_time = self._consumer_metrics(consumer)
        started = time.perf_counter()
        try:
            message = self._parse(message_type, msg.data)
            await handler(message, delivery)
        except Reject as exc:
            await self._dead_letter(consumer, msg, delivery, str(exc))
            return
        except Exception as exc:
            if await self._failed(consumer, delivery, exc):
                nak_count.inc()
            return
        finally:
            handle_time.observe(time.perf_counter() - started)
        if not delivery.deferred:
            await delivery.ack()
        ok_count.inc()

    def _parse(self, message_type: type[T], data: bytes) -> T:
        """The payload as `message_type`; `Reject` if it does not parse or names another run."""
        try:
            message = message_type.FromString(data)
        except DecodeError as exc:
            raise Reject(f"malformed {message_type.__name__}: {exc}") from None
        run_id = getattr(message, "run_id", None)
        if run_id is not None and run_id != self.run_id:
            raise Reject(f"{message_type.__name__}.run_id is {run_id!r}, expected {self.run_id!r}")
        return message

    async def _handle_batch(
        self, consumer: str, message_type: type[T] | None, handler: BatchHandler[Any], msgs: list[Msg]
    ) -> None:
        ok_count, nak_count, handle_time = self._consumer_metrics(consumer)
        started = time.perf_counter()
        batch: list[Received[Any]] = []
        for msg in msgs:
            delivery = Delivery(msg)
            if message_type is None:
                batch.append(Received(msg.data, delivery))
                continue
            try:
                batch.append(Received(self._parse(message_type, msg.data), delivery))
            except Reject as exc:
                await self._dead_letter(consumer, msg, delivery, str(exc))
        if not batch:
            return
        outcomes: Sequence[Outcome] | None
        try:
            outcomes = await handler(batch)
        except Exception as exc:
            outcomes = [exc] * len(batch)
        if outcomes is None:
            outcomes = [None] * len(batch)
        elif len(outcomes) != len(batch):
            bug = RuntimeError(f"batch handler gave {len(outcomes)} outcomes for {len(batch)} messages")
            outcomes = [bug] * len(batch)
        handle_time.observe((time.perf_counter() - started) / len(msgs))
        handled = naked = 0
        for item, outcome in zip(batch, outcomes, strict=True):
            delivery = item.delivery
            if outcome is None:
                if not delivery.deferred:
                    await delivery.ack()
                handled += 1
            elif isinstance(outcome, Reject):
                await self._dead_letter(consumer, delivery._msg, delivery, str(outcome))
            elif await self._failed(consumer, delivery, outcome):
                naked += 1
        if handled:
            ok_count.inc(handled)
        if naked:
            nak_count.inc(naked)

    async def _failed(self, consumer: str, delivery: Delivery, exc: BaseException) -> bool:
        """A handler failed on this message: nak it with backoff (True), or dead-letter it at its
        last delivery (False; never for a consumer without a limit)."""
        reason = f"{type(exc).__name__}: {exc}"
        limit = self.consumers[consumer].max_deliver  # -1: no limit, retried until it succeeds
        if 0 < limit <= delivery.num_delivered:
            await self._dead_letter(
                consumer, delivery._msg, delivery, f"failed {delivery.num_delivered} times; last: {reason}"
            )
            return False
        log.warning("handler on %s failed (delivery %d): %s", consumer, delivery.num_delivered, reason)
        backoff = self.cfg.nak_backoff_s
        await delivery.nak(backoff[min(delivery.num_delivered, len(backoff)) - 1] if backoff else None)
        return True

    async def dead_letter_undelivered(self, *, stop: asyncio.Event) -> None:
        """Until `stop`, dead-letter each message of the run that ran out of deliveries (from the
        server's advisories, kept by the advisory stream): the message as stored, the consumer that
        never answered, how often it was delivered. Run by one process per run (the orchestrator)."""

        async def handle(batch: list[Received[bytes]]) -> list[Outcome]:
            return [await self._undelivered(r.message) for r in batch]

        await self.consume_batches("undelivered", None, handle, stop=stop)

    async def _undelivered(self, advisory: bytes) -> Outcome:
        try:
            fields = json.loads(advisory)
            consumer, seq = str(fields["consumer"]), int(fields["stream_seq"])
            deliveries = int(fields["deliveries"])
        except (ValueError, KeyError, TypeError) as exc:
            return Reject(f"not a max-deliveries advisory ({type(exc).__name__}: {exc})")
        try:
            stored = await self.js.get_msg(self.subjects.stream, seq)
        except nats.js.errors.NotFoundError:
            return None  # acked late after all, or aged out: nothing is left to account for
        reason = (
            f"delivered {deliveries} times and never acked: the {consumer} process died or hung "
            "each time it held this message"
        )
        letter = policy_pb2.DeadLetter(
            subject=stored.subject or "",
            payload=stored.data or b"",
            reason=reason,
            consumer=consumer,
            deliveries=deliveries,
            msg_id=(stored.headers or {}).get("Nats-Msg-Id", ""),
            dead_at=time.time(),
        )
        log.error("dead-lettered from %s: %s", consumer, reason)
        await self.publish(self.subjects.dlq, letter, msg_id=f"dlq:{consumer}:{seq}")
        HANDLED.labels(consumer, "dead_letter").inc()
        return None

    async def _dead_letter(self, consumer: str, msg: Msg, delivery: Delivery, reason: str) -> None:
        letter = policy_pb2.DeadLetter(
            subject=msg.subject,
            payload=msg.data,
            reason=reason,
            consumer=consumer,
            deliveries=delivery.num_delivered,
            msg_id=delivery.msg_id,
            dead_at=time.time(),
        )
        log.error("dead-lettered from %s: %s", consumer, reason)
        msg_id = f"dlq:{consumer}:{delivery.stream_seq}"
        try:
            try:
                await self.publish(self.subjects.dlq, letter, msg_id=msg_id)
            except Exception:
                if not letter.payload:
                    raise
                # a letter around a payload near max_payload can never be published whole
                letter.payload, letter.reason = (
                    b"",
                    f"{reason} (payload left out: the letter was not accepted)",
                )
                await self.publish(self.subjects.dlq, letter, msg_id=msg_id)
            await msg.term()
        except Exception as exc:
            # not lost: redelivered, and dead-lettered then (a dead consumer loop would stall them all)
            log.warning("could not dead-letter from %s (%s); it will be redelivered", consumer, exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.cfg.reconnect_wait_s)
            return
        HANDLED.labels(consumer, "dead_letter").inc()

    # --- fan-out subscriptions, request/reply ----------------------------------------------

    async def subscribe(
        self, subject: str, message_type: type[T], handler: Callable[[T], Awaitable[None]]
    ) -> Any:
        """A plain subscription (every replica sees every message); bad payloads are logged, skipped."""

        async def on_msg(msg: Msg) -> None:
            try:
                message = message_type.FromString(msg.data)
            except DecodeError as exc:
                log.error("malformed %s on %s: %s", message_type.__name__, msg.subject, exc)
                return
            await handler(message)

        return await self.nc.subscribe(subject, cb=on_msg)

    async def request(self, subject: str, message: Message, reply_type: type[R], *, timeout_s: float) -> R:
        msg = await self.nc.request(subject, message.SerializeToString(), timeout=timeout_s)
        return reply_type.FromString(msg.data)

    async def serve(
        self,
        subject: str,
        request_type: type[T],
        handler: Callable[[T], Awaitable[Message]],
        *,
        queue: str,
        on_malformed: Callable[[str], Message],
    ) -> Any:
        """Answer requests on `subject` in queue group `queue`, each in its own task."""
        tasks: set[asyncio.Task[None]] = set()

        async def answer(msg: Msg) -> None:
            try:
                request = request_type.FromString(msg.data)
            except DecodeError as exc:
                reply = on_malformed(f"malformed {request_type.__name__}: {exc}")
            else:
                reply = await handler(request)
            if msg.reply:
                with contextlib.suppress(nats.errors.Error):
                    await msg.respond(reply.SerializeToString())

        async def on_msg(msg: Msg) -> None:
            task = asyncio.create_task(answer(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    # --- KV ----------------------------------------------------------------------------------

    async def _bucket(self) -> Any:
        if self._kv is None:
            self._kv = await self.js.key_value(self.subjects.kv_bucket)
        return self._kv

    async def kv_put(self, key: str, value: bytes) -> None:
        await (await self._bucket()).put(key, value)

    async def kv_get(self, key: str) -> bytes | None:
        try:
            entry = await (await self._bucket()).get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value  # type: ignore[no-any-return]

    async def put_head(self, version: policy_pb2.WeightVersion) -> None:
        await self.kv_put(HEAD_KEY, version.SerializeToString())

    async def get_head(self) -> policy_pb2.WeightVersion | None:
        raw = await self.kv_get(HEAD_KEY)
        return None if raw is None else policy_pb2.WeightVersion.FromString(raw)

    async def is_paused(self) -> bool:
        return (await self.kv_get(PAUSED_KEY)) == b"1"

    async def consumer_pending(self, consumer: str) -> tuple[int, int]:
        """(messages not yet delivered, delivered but unacked) of a declared consumer."""
        info = await self.js.consumer_info(self.stream_of(consumer), self.consumers[consumer].durable)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)


class BatchPublisher:
    """Coalesces publishes from many tasks into pipelined batches (`Bus.publish_many`): whatever
    is added while the previous batch goes out is published together, up to `max_batch` at a time
    and `in_flight` batches awaiting their acks at once. Each publication's `done` callback learns
    whether the server stored it (None) or why not, so its sender acts only on a stored message.

    One JetStream publish through `Bus.publish` costs a request inbox, a future and a timeout of
    its own; a completion a replica publishes as soon as it is sampled costs a dictionary entry
    here. `run()` must be running; after `close()` it publishes what is pending, then returns."""

    def __init__(self, bus: Bus, *, max_batch: int = 512, in_flight: int = 4) -> None:
        self.bus = bus
        self.max_batch = max_batch
        self.in_flight = in_flight
        self.pending: list[tuple[Publication[Any], Callable[[BaseException | None], None]]] = []
        self.wakeup = asyncio.Event()
        self.closing = False

    def add(self, publication: Publication[Any], done: Callable[[BaseException | None], None]) -> None:
        self.pending.append((publication, done))
        if not self.wakeup.is_set():
            self.wakeup.set()

    async def publish(self, publication: Publication[Any]) -> None:
        """Publish one message with the next batch; raises what refused it."""
        stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(error: BaseException | None) -> None:
            if stored.done():  # the sender was cancelled meanwhile
                return
            if error is None:
                stored.set_result(None)
            else:
                stored.set_exception(error)

        self.add(publication, done)
        await stored

    async def run(self) -> None:
        flying: set[asyncio.Task[None]] = set()
        while not (self.closing and not self.pending):
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.pending:
                if len(flying) >= self.in_flight:
                    await asyncio.wait(flying, return_when=asyncio.FIRST_COMPLETED)
                    continue
                batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
                task = asyncio.create_task(self._publish(batch))
                flying.add(task)
                task.add_done_callback(flying.discard)
        if flying:
            await asyncio.gather(*flying)

    async def _publish(
        self, batch: list[tuple[Publication[Any], Callable[[BaseException | None], None]]]
    ) -> None:
        try:
            await self.bus.publish_many(p for p, _ in batch)
        except PublishError as exc:  # those refused fail; the rest were stored
            for j, (_, done) in enumerate(batch):
                done(exc.errors.get(j))
        except Exception as exc:  # no answer: none is known stored
            for _, done in batch:
                done(exc)
        else:
            for _, done in batch:
                done(None)

    def close(self) -> None:
        self.closing = True
        self.wakeup.set()
