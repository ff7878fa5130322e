"""The two JetStream exchanges the bus repeats for every message, done with a batch's worth of work
per round instead of a message's: pulling from a durable consumer and publishing with acks.

- `Puller` asks a durable pull consumer for up to N messages with one request on a private inbox
  and buffers what arrives; the caller takes whatever is there (one wake-up per batch, not an
  awaited future and a timeout per message as `PullSubscription.fetch` has). What is asked for
  counts against the caller's room, so messages delivered but not yet handled never exceed it;
  with two requests outstanding the next batch travels while the last one is handled.
- `PubAcks` publishes a batch of JetStream messages, each with its own reply subject on one
  wildcard inbox, and waits for the batch's acks on ONE future: an ack costs a dictionary lookup,
  where `publish_async` costs a future, a task wake-up and a JSON parse each.

Both use only nats-py's public client API (subscribe, publish, Msg). Not covered: what the
messages mean, acking them (the bus), reconnecting (nats-py re-subscribes the inboxes by itself;
a pull request lost with a connection is given up at its deadline and asked again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

EXPIRY_GRACE_S: Final = 1.0
"""How long past its expiry a pull request's end (408) may take to arrive before it is looked into."""
LOST_AFTER_S: Final = 30.0
"""A request unanswered this long past its expiry is given up even without a reconnect."""
STALE_POLL_S: Final = 0.05
"""While a request past its expiry is neither answered nor known lost, how often to look again."""
NO_PAYLOAD_LIMIT: Final = -1
"""The inboxes' pending limits are off: what arrives was asked for, so it is bounded already."""


class PullError(nats.errors.Error):  # type: ignore[misc]
    """The server ended a pull request with an error status (409: consumer deleted, ...)."""


class PublishError(nats.errors.Error):  # type: ignore[misc]
    """Some publishes of a batch were refused; `errors` maps their index to the reason."""

    def __init__(self, errors: dict[int, Exception]) -> None:
        first = errors[min(errors)]
        super().__init__()
        self.errors = errors
        self.description = f"{len(errors)} publish(es) refused; first: {first}"

    def __str__(self) -> str:
        return f"nats: {self.description}"


def ack_info(reply: str) -> tuple[int, int]:
    """(times delivered, stream sequence) from a JetStream message's ack subject, either form:
    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` or the one with a
    domain and account hash after `$JS.ACK`."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[4]), int(tokens[5])
    return int(tokens[6]), int(tokens[7])


class _Request:
    __slots__ = ("deadline", "owed", "reconnects", "rid")

    def __init__(self, rid: str, owed: int, deadline: float, reconnects: int) -> None:
        self.rid = rid
        self.owed = owed
        self.deadline = deadline
        self.reconnects = reconnects


class Puller:
    """Pull requests to one durable consumer, answered on this puller's own inbox.

    Up to `depth` requests are outstanding at once (the server serves them in order), so with 2
    the next batch is on its way while the last is handled. Every message asked for counts
    against the caller's room until it is taken, and `fetch` never hands over more than the room,
    so the caller never holds more than it said it can. A request ends when its last message or
    its end status (404, 408, 409) arrives, which the server sends after the messages; one past
    its expiry is given up only after a reconnect (it was lost with the connection) or
    `LOST_AFTER_S` later, never while its messages may still be queued in a busy client.
    """

    def __init__(self, nc: NATS, stream: str, durable: str, *, depth: int = 1) -> None:
        self.nc = nc
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = nc.new_inbox()
        self.depth = depth
        self.sub: Any = None
        self.buffer: list[Msg] = []
        self.requests: deque[_Request] = deque()
        """Outstanding requests, oldest first, with what each may still deliver."""
        self.failure = ""
        self._next_rid = 0
        self._wake: asyncio.Future[None] | None = None

    @property
    def owed(self) -> int:
        """Messages the outstanding requests may still deliver."""
        return sum(r.owed for r in self.requests)

    async def start(self) -> Puller:
        self.sub = await self.nc.subscribe(
            f"{self.inbox}.*",
            cb=self._on_msg,
            pending_msgs_limit=NO_PAYLOAD_LIMIT,
            pending_bytes_limit=NO_PAYLOAD_LIMIT,
        )
        return self

    async def close(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await self.sub.unsubscribe()
            self.sub = None

    async def _on_msg(self, msg: Msg) -> None:
        if msg.reply:  # a stream message (status messages have no reply subject)
            self.buffer.append(msg)
            if self.requests:
                head = self.requests[0]
                head.owed -= 1
                if head.owed <= 0:
                    self.requests.popleft()
        else:
            status = (msg.headers or {}).get("Status", "")
            if status == "100":  # idle heartbeat
                return
            rid = msg.subject[len(self.inbox) + 1 :]
            ended = next((r for r in self.requests if r.rid == rid), None)
            if ended is None:
                return  # the end of a request given up earlier
            self.requests.remove(ended)  # 404 no messages, 408 expired, 409 and the rest: it is over
            if status not in ("404", "408"):
                description = (msg.headers or {}).get("Description", "")
                self.failure = f"pull request ended with {status} {description}".strip()
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def fetch(self, room: int, timeout_s: float, *, size: int) -> list[Msg]:
        """Up to `min(room, size)` messages, or [] when none came within about `timeout_s`.
        `room` is how many the caller can take on now, counting those already asked for;
        requests ask for at most `size` each. Whatever has arrived is returned at once."""
        self._forget_lost()
        free = room - len(self.buffer) - self.owed
        while free > 0 and len(self.requests) < self.depth and (not self.requests or free >= size):
            n = min(size, free)
            await self._ask(n, timeout_s)
            free -= n
        if not self.buffer and self.requests:
            self._wake = asyncio.get_running_loop().create_future()
            wait_s = max(STALE_POLL_S, min(r.deadline for r in self.requests) - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake, wait_s)
            self._wake = None
            self._forget_lost()
        if self.failure and not self.buffer:
            failure, self.failure = self.failure, ""
            raise PullError(failure)
        n = max(0, min(room, size))
        got, self.buffer = self.buffer[:n], self.buffer[n:]
        return got

    def _forget_lost(self) -> None:
        """Give up requests past their expiry that were lost: asked before a reconnect, or
        unanswered for `LOST_AFTER_S` (a busy client may simply not have read their end yet)."""
        now = time.monotonic()
        reconnects = self.nc.stats["reconnects"]
        for r in [r for r in self.requests if now >= r.deadline]:
            if r.reconnects != reconnects or now >= r.deadline + LOST_AFTER_S:
                self.requests.remove(r)

    async def _ask(self, n: int, timeout_s: float) -> None:
        self._next_rid += 1
        deadline = time.monotonic() + timeout_s + EXPIRY_GRACE_S
        request = _Request(str(self._next_rid), n, deadline, self.nc.stats["reconnects"])
        self.requests.append(request)
        body = json.dumps({"batch": n, "expires": int(timeout_s * 1e9)}).encode()
        try:
            await self.nc.publish(self.next_subject, body, reply=f"{self.inbox}.{request.rid}")
        except BaseException:
            self.requests.remove(request)
            raise


class _Batch:
    __slots__ = ("done", "duplicates", "errors", "first", "remaining")

    def __init__(self, first: int, n: int, done: asyncio.Future[None]) -> None:
        self.first = first
        self.remaining = n
        self.done = done
        self.duplicates = 0
        self.errors: dict[int, Exception] = {}


class PubAcks:
    """JetStream publishes whose acks come back on one wildcard inbox, counted per batch."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox() + "."
        self.next_id = 0
        self.waiting: dict[int, _Batch] = {}
        self.sub: Any = None

    async def start(self) -> PubAcks:
        self.sub = await self.nc.subscribe(
            self.prefix + "*",
            cb=self._on_ack,
            pending_msgs_limit=NO_PAYLOAD_LIMIT,
            pending_bytes_limit=NO_PAYLOAD_LIMIT,
        )
        return self

    async def _on_ack(self, msg: Msg) -> None:
        rid = int(msg.subject[len(self.prefix) :])
        batch = self.waiting.pop(rid, None)
        if batch is None:
            return  # its batch timed out
        data = msg.data
        if not data:  # a status: 503 when no stream takes the subject
            status = (msg.headers or {}).get("Status", "")
            batch.errors[rid - batch.first] = (
                nats.js.errors.NoStreamResponseError()
                if status == "503"
                else nats.js.errors.APIError(description=f"publish answered with status {status}")
            )
        elif b'"error"' in data:
            batch.errors[rid - batch.first] = nats.js.errors.APIError.from_error(json.loads(data)["error"])
        elif b'"duplicate"' in data:
            batch.duplicates += 1
        batch.remaining -= 1
        if batch.remaining == 0 and not batch.done.done():
            batch.done.set_result(None)

    async def publish(self, items: Sequence[tuple[str, bytes, str]], *, timeout_s: float) -> int:
        """Publish (subject, payload, msg id) triples; return once the server has acked every one,
        with the number it found duplicate. Raises `PublishError` if any was refused and
        TimeoutError if the acks did not all come within `timeout_s`."""
        if not items:
            return 0
        first = self.next_id
        self.next_id += len(items)
        batch = _Batch(first, len(items), asyncio.get_running_loop().create_future())
        publish, prefix, waiting = self.nc.publish, self.prefix, self.waiting
        try:
            for i, (subject, payload, msg_id) in enumerate(items):
                waiting[first + i] = batch
                await publish(subject, payload, reply=f"{prefix}{first + i}", headers={"Nats-Msg-Id": msg_id})
            await asyncio.wait_for(batch.done, timeout_s)
        finally:
            if batch.remaining:
                for rid in range(first, first + len(items)):
                    waiting.pop(rid, None)
        if batch.errors:
            raise PublishError(batch.errors)
        return batch.duplicates
