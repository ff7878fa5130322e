"""The ledger writer: the only writer of a run's ledger, fed by the `ledger` durable consumer.

The `ledger` consumer sees every subject of the run; it hands the writer a pull at a time
(`Bus.consume_batches`, the next pull already on its way). Each message is decoded by its subject
kind (`events.decode`), mapped to rows (`events.to_rows`) and buffered with its ack deferred; the
buffer is written in ONE transaction (`Ledger.write_batch`) as soon as it holds `batch_size` rows,
or at least every `[ledger] flush_interval_s`, and only after the commit are its messages acked.
Commits run in their own task, one at a time and in stream order, while the next events are read
and mapped; what arrived during a commit is committed next, at once; with `BACKLOG_BATCHES`
batches waiting, reading waits for the database.

A crash therefore loses nothing (unacked messages are redelivered) and a replay changes nothing
(the upserts are idempotent and statuses only move forward). A lost database connection is
retried; an event whose data the database refuses (say, an id too long for its column) is
isolated by writing the batch item by item, dead-lettered with the database's reason and acked,
so it never blocks the rest; should that dead letter fail to publish, the event stays unacked and
its letter is tried again with the next flush. A flush that fails otherwise is retried with
backoff, its batch kept; after `FLUSH_ATTEMPTS` in a row the writer stops with the error (and so
does the service), rather than buffering on without committing. A payload that does not parse,
or that names another run, is dead-lettered by the bus; the dead letter then comes back here and
is recorded.

A starting orchestrator first calls `catch_up`, so that the scheduler restores its groups from a
ledger that holds everything the stream does (the requests a crashed predecessor had just sent).

After each commit the batch's events are handed to observers (the scheduler, WatchEvents
streams), in stream order, so they see exactly what the ledger holds.

Not covered: deciding anything (that is the scheduler) or reading the ledger back (the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Final, NamedTuple

import nats.errors
import sqlalchemy.exc
from google.protobuf.message import DecodeError, Message
from nats.js import api

from offbeat.bus import Bus, Delivery, Outcome, Received, Reject
from offbeat.config import LedgerConfig
from offbeat.ledger import Ledger
from offbeat.v1 import policy_pb2
from offbeat_orchestrator.events import Rows, decode, event_kind, to_rows

log = logging.getLogger("offbeat.orchestrator.ledger")

RETRY_BACKOFF_S: Final = (0.2, 0.5, 1.0, 2.0, 5.0)
MAX_SUBJECTS_CACHED: Final = 256
BACKLOG_BATCHES: Final = 4
"""Batches of rows that may wait for the database before reading stops (backpressure)."""
FLUSH_ATTEMPTS: Final = 6
"""Failed flushes in a row after which the writer gives up (and the service exits with the error)."""
LETTER_ATTEMPTS: Final = 3
"""Failed publishes of a refused event's dead letter after which it is sent without its payload
(a letter wrapping a payload near `max_payload_bytes` can never be published whole)."""
CATCH_UP_TIMEOUT_S: Final = 60.0
"""Longest `catch_up` reads the stream into the ledger before the scheduler restores anyway."""
REFUSED_SQLSTATE_CLASSES: Final = ("22", "23", "42")
"""SQLSTATE classes about the data itself (data exception, integrity violation, syntax or access):
retrying cannot help. Anything else (connection lost, shutdown, deadlock) is retried."""


def refused(exc: Exception) -> bool:
    if isinstance(
        exc, (sqlalchemy.exc.DataError, sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)
    ):
        return True
    state = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    return isinstance(exc, sqlalchemy.exc.DBAPIError) and str(state)[:2] in REFUSED_SQLSTATE_CLASSES


class RefusedError(Exception):
    """The database rejected a batch's data."""


class Observed(NamedTuple):
    """One event the ledger has committed (a tuple: one is made per event, so it must be cheap)."""

    kind: str
    """Subject kind with `control.*` folded to `control` (`rollout.completion`, `trainer.step`, ...)."""
    subject: str
    message: Message
    at: float


Observer = Callable[[list[Observed]], None]


class _Pending(NamedTuple):
    """A buffered event (or rows the orchestrator enqueued itself: no delivery, no event). The
    rows of a bus event are in the batch's `Rows`, and made again only if the batch is refused."""

    delivery: Delivery | None
    event: Observed | None
    rows: Rows | None


class _Letter(NamedTuple):
    """The dead letter of an event the database refused, not yet published (its event unacked)."""

    delivery: Delivery
    letter: policy_pb2.DeadLetter
    failures: int


class LedgerWriter:
    """Batches bus events into ledger transactions; acks each message after its batch commits."""

    def __init__(
        self, bus: Bus, ledger: Ledger, cfg: LedgerConfig, *, throughput_window_s: float = 60.0
    ) -> None:
        self.bus = bus
        self.ledger = ledger
        self.cfg = cfg
        self.run_id = bus.run_id
        self.observers: list[Observer] = []
        self._pending: list[_Pending] = []
        self._batch = Rows()
        """The rows of everything in `_pending`, gathered as events arrive."""
        self._kinds: dict[str, str] = {}
        """Subject -> event kind, for the subjects seen (a handful)."""
        self._rows = 0
        self._letters: list[_Letter] = []
        self._lock = asyncio.Lock()
        self._full = asyncio.Event()
        self._window_s = throughput_window_s
        self._completions: deque[tuple[float, int]] = deque()
        self.committed_events = 0
        self.batches = 0

    # --- consuming ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then write what is buffered. Cancelling it (a crash) writes
        nothing more and acks nothing more: those messages are redelivered to the next writer. If
        the flush loop gives up, reading stops too and this raises its error, so the service that
        supervises the writer exits instead of reading on without committing."""
        flusher = asyncio.create_task(self._flush_loop(stop), name="ledger-flush")
        reader = asyncio.create_task(
            self.bus.consume_batches("ledger", None, self._handle_batch, stop=stop), name="ledger-read"
        )
        # on a stop, the commit under way finishes (and is acked) before the rest, in stream order
        reader.add_done_callback(lambda _: self._full.set())
        try:
            await asyncio.wait((flusher, reader), return_when=asyncio.FIRST_EXCEPTION)
            for task in (flusher, reader):
                if task.done():
                    task.result()
        finally:
            for task in (flusher, reader):
                task.cancel()
            await asyncio.gather(flusher, reader, return_exceptions=True)
        if stop.is_set():
            await self.flush()

    async def _flush_loop(self, stop: asyncio.Event) -> None:
        """Commit whenever a batch is full or `flush_interval_s` has passed; and what arrived while
        a commit ran goes next, at once (group commit): when the database is the bottleneck its
        batches grow, and the last events of a burst do not wait out the interval. A failed flush
        (its batch is kept) is retried after a backoff; the `FLUSH_ATTEMPTS`-th failure in a row
        is raised: a writer that silently stopped committing would stall the scheduler."""
        failures = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.cfg.flush_interval_s)
            self._full.clear()
            try:
                while await self.flush() and self._pending and not stop.is_set():
                    pass
            except Exception:
                failures += 1
                if failures >= FLUSH_ATTEMPTS:
                    log.error("ledger flush failed %d times in a row; the ledger writer stops", failures)
                    raise
                delay = RETRY_BACKOFF_S[min(failures - 1, len(RETRY_BACKOFF_S) - 1)]
                log.exception("ledger flush failed (%d in a row); retrying in %.1fs", failures, delay)
                await asyncio.sleep(delay)
            else:
                failures = 0

    async def _handle_batch(self, batch: list[Received[bytes]]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        at = time.time()
        for item in batch:
            try:
                self._take(item.message, item.delivery, at)
            except Exception as exc:  # Reject: dead-lettered; anything else: nak'ed; this event only
                outcomes.append(exc)
            else:
                outcomes.append(None)
        if self._rows >= self.cfg.batch_size:
            self._full.set()
            if self._rows >= BACKLOG_BATCHES * self.cfg.batch_size:
                await self.flush()  # the database is behind: wait for it instead of reading on
        return outcomes

    def _take(self, data: bytes, delivery: Delivery, at: float) -> None:
        subject = delivery.subject
        kind = self._kinds.get(subject)
        if kind is None:
            kind = event_kind(self.bus.subjects.kind(subject))
            if len(self._kinds) < MAX_SUBJECTS_CACHED:  # a fuzzer may invent subjects without end
                self._kinds[subject] = kind
        try:
            message = decode(kind, data)
        except DecodeError as exc:
            raise Reject(f"malformed {kind} event: {exc}") from None
        before = len(self._batch.trajectories)
        key = self._key(kind, delivery)
        to_rows(self.run_id, kind, message, key=key, root=self.bus.subjects.root, into=self._batch)
        delivery.defer()
        self._pending.append(_Pending(delivery, Observed(kind, subject, message, at), None))
        self._rows += max(1, len(self._batch.trajectories) - before)

    @staticmethod
    def _key(kind: str, delivery: Delivery) -> str:
        """What names a dead letter in the ledger (only dead letters need one)."""
        return delivery.msg_id or f"seq:{delivery.stream_seq}" if kind == "dlq" else ""

    def enqueue(self, rows: Rows) -> None:
        """Rows the orchestrator itself decides (e.g. samples failed after their last attempt);
        written with the next batch."""
        self._pending.append(_Pending(None, None, rows))
        self._batch.extend(rows)
        self._rows += len(rows)

    # --- writing -----------------------------------------------------------------------------

    async def flush(self) -> int:
        """Write everything buffered in one transaction, then ack and notify. Returns events written.
        If it raises, the batch goes back in front of the buffer (writing it again changes nothing)."""
        async with self._lock:
            letters, self._letters = self._letters, []
            for letter in letters:
                await self._dead_letter(letter)
            if not self._pending:
                return 0
            batch, rows, count = self._pending, self._batch, self._rows
            self._pending, self._batch, self._rows = [], Rows(), 0
            try:
                written = await self._commit(batch, rows)
                for item in written:
                    if item.delivery is not None:
                        await item.delivery.ack()
            except Exception:
                rows.extend(self._batch)
                self._pending, self._batch, self._rows = batch + self._pending, rows, count + self._rows
                raise
            events = [item.event for item in written if item.event is not None]
            self.committed_events += len(events)
            self.batches += 1
            self._account(events)
        for observer in list(self.observers):
            try:
                observer(events)
            except Exception:
                log.exception("ledger observer failed")
        return len(events)

    async def _commit(self, batch: list[_Pending], rows: Rows) -> list[_Pending]:
        """Commit the batch; if the database refuses its data (not a connection problem), commit
        item by item and dead-letter the items it refuses, so one bad event never wedges the ledger."""
        try:
            await self._write(rows)
            return batch
        except RefusedError:
            pass
        written = []
        for item in batch:
            try:
                await self._write(self._rows_of(item))
                written.append(item)
            except RefusedError as exc:
                await self._refuse(item, str(exc))
        return written

    def _rows_of(self, item: _Pending) -> Rows:
        if item.rows is not None:
            return item.rows
        assert item.event is not None and item.delivery is not None
        key = self._key(item.event.kind, item.delivery)
        return to_rows(self.run_id, item.event.kind, item.event.message, key=key, root=self.bus.subjects.root)

    async def _write(self, rows: Rows) -> None:
        """Retry until the transaction commits (the database may restart); never ack before.
        Raises RefusedError when the database rejects the data itself."""
        attempt = 0
        while True:
            try:
                await self.ledger.write_batch(
                    self.run_id,
                    trajectories=rows.trajectories,
                    policy_versions=rows.policy_versions,
                    live=rows.live,
                    trainer_steps=rows.trainer_steps,
                    dead_letters=rows.dead_letters,
                    eval_versions=rows.eval_versions,
                    batch_size=self.cfg.batch_size,
                )
                return
            except Exception as exc:
                if refused(exc):
                    raise RefusedError(str(getattr(exc, "orig", None) or exc).splitlines()[0]) from exc
                delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                attempt += 1
                log.warning("ledger write failed (attempt %d, retrying in %.1fs): %s", attempt, delay, exc)
                await asyncio.sleep(delay)

    async def _refuse(self, item: _Pending, reason: str) -> None:
        reason = f"ledger refused the event: {reason}"
        log.error("%s", reason)
        d = item.delivery
        if d is None:
            return
        letter = policy_pb2.DeadLetter(
            subject=d.subject,
            payload=d.data,
            reason=reason,
            consumer="ledger",
            deliveries=d.num_delivered,
            msg_id=d.msg_id,
            dead_at=time.time(),
        )
        await self._dead_letter(_Letter(d, letter, 0))

    async def _dead_letter(self, entry: _Letter) -> None:
        """Publish a refused event's dead letter, then ack the event. If the publish fails (NATS
        timed out, the letter is over `max_payload_bytes`), the event stays unacked and the letter
        is tried again with the next flush; from its `LETTER_ATTEMPTS`-th try on, without payload."""
        d, letter = entry.delivery, entry.letter
        try:
            await self.bus.publish(self.bus.subjects.dlq, letter, msg_id=f"dlq:ledger:{d.stream_seq}")
        except Exception as exc:
            failures = entry.failures + 1
            log.warning(
                "could not publish the dead letter of %s (stream seq %d, %d tries; retrying): %s",
                d.subject,
                d.stream_seq,
                failures,
                exc,
            )
            if failures + 1 >= LETTER_ATTEMPTS and letter.payload:
                letter.payload = b""
                letter.reason += " (payload left out: the letter could not be published with it)"
            self._letters.append(entry._replace(failures=failures))
            return
        await d.ack()

    # --- catching up at start-up ---------------------------------------------------------------

    async def catch_up(
        self, *, stop: asyncio.Event | None = None, timeout_s: float = CATCH_UP_TIMEOUT_S
    ) -> bool:
        """Upsert into the ledger what the run's stream holds beyond the `ledger` consumer's ack
        floor, so that a restarted scheduler restores from a ledger that has it all. A crashed
        writer's last events (the requests just sent, above all) are held unacked by the server
        until `ack_wait` passes, and those it never read are still to come: restoring without
        them, the scheduler would count none of those groups against the budget (dispatching up
        to twice the budget) and neither re-issue them nor announce them lost.

        They are read straight from the stream (a short-lived consumer that acks nothing), in
        chunks of `batch_size`, and written without acking and without telling observers: the
        `ledger` consumer still delivers them, and a replay changes nothing. An event the
        database refuses is skipped here (that consumer dead-letters it). Nothing to read (a
        fresh run, a clean stop): one request. Returns False, after a warning, when the stream
        was not read to the end within `timeout_s`."""
        bus, spec = self.bus, self.bus.consumers["ledger"]
        stream = bus.stream_of("ledger")
        info = await bus.js.consumer_info(stream, spec.durable)
        if not info.num_pending and not info.num_ack_pending:
            return True
        first = (info.ack_floor.stream_seq or 0) + 1 if info.ack_floor else 1
        last = (await bus.js.stream_info(stream)).state.last_seq
        started = time.monotonic()
        deadline = started + timeout_s
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=first,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
        )
        sub = await bus.js.pull_subscribe(spec.filter_subject, stream=stream, config=config)
        seq, events, done = first - 1, 0, False
        try:
            while not done and (stop is None or not stop.is_set()) and time.monotonic() < deadline:
                try:
                    msgs = await sub.fetch(self.cfg.batch_size, timeout=min(1.0, deadline - time.monotonic()))
                except TimeoutError:  # nothing left (the last ones were acked by every consumer)
                    done = time.monotonic() < deadline
                    break
                items = []
                for msg in msgs:
                    delivery = Delivery(msg)
                    seq = delivery.stream_seq
                    kind = event_kind(bus.subjects.kind(msg.subject))
                    with contextlib.suppress(DecodeError, Reject):  # the `ledger` consumer rejects it
                        message = decode(kind, msg.data)
                        key = self._key(kind, delivery)
                        items.append(to_rows(self.run_id, kind, message, key=key, root=bus.subjects.root))
                await self._upsert(items)
                events += len(items)
                done = seq >= last or msgs[-1].metadata.num_pending == 0
        finally:
            await sub.unsubscribe()
            with contextlib.suppress(nats.errors.Error):  # else it goes after `inactive_threshold`
                await bus.js.delete_consumer(stream, str(config.name))  # named by `pull_subscribe`
        elapsed = time.monotonic() - started
        if not done:
            log.warning(
                "ledger catch-up read the stream to seq %d of %d in %.1fs and stopped: restoring from a "
                "ledger without the rest (groups dispatched there are neither counted nor re-issued)",
                seq,
                last,
                elapsed,
            )
            return False
        log.info("ledger caught up: %d events up to stream seq %d in %.2fs", events, last, elapsed)
        return True

    async def _upsert(self, items: list[Rows]) -> None:
        rows = Rows()
        for item in items:
            rows.extend(item)
        try:
            await self._write(rows)
        except RefusedError:
            for item in items:
                with contextlib.suppress(RefusedError):
                    await self._write(item)

    def _account(self, events: list[Observed]) -> None:
        now = time.time()
        for e in events:
            if e.kind == "rollout.completion":
                self._completions.append((now, len(e.message.completion_token_ids)))  # type: ignore[attr-defined]
        while self._completions and self._completions[0][0] < now - self._window_s:
            self._completions.popleft()

    def throughput(self) -> tuple[float, float]:
        """(tokens/s, trajectories/s) of completions committed over the last window."""
        self._account([])
        if not self._completions:
            return 0.0, 0.0
        span = max(1.0, min(self._window_s, time.time() - self._completions[0][0]))
        tokens = sum(n for _, n in self._completions)
        return tokens / span, len(self._completions) / span
