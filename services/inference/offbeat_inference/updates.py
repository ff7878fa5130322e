"""Following the policy: weight announcements in, verified weights into the engine, PolicyLive out.

The follower subscribes to `policy.weights` (every replica sees every announcement) BEFORE it reads
the head from KV, so no version published during start-up is missed. Announcements are applied
one at a time in arrival order; when several arrive during one apply, only the newest is applied
next (the ones in between would be live for no step). A version equal to the one live is not
re-applied. Re-announcements after a rollback carry an older id and are applied like any other.

Fetching: `file://` uris are read in place by the engine, which hashes the bytes as it reads them
and refuses them unless they are the announced ones (`Engine.update_weights(sha256=..., chunks=...)`:
the chunk digests where the announcement has them, verified in parallel, else the sha256);
`nats://bucket/name` uris are streamed into a file under `weights_dir`, hashed as they are
written (by the chunk digests, else the sha256; the store refuses a mismatch), applied and then
deleted.
Every outcome is published as a `PolicyLive` (msg id `live:{replica}:{version}:{apply count}`):
`ok` with the apply latency, or not ok with the reason; a refused version leaves the old weights
serving. A PolicyLive that cannot be published (NATS away) is retried until it is; no failure
stops the follower.

Announcements are plain (core NATS) messages, so one published while this replica was
disconnected never arrives: every `head_poll_s` the follower reads the head from KV again and
applies it when the head changed to a version it does not serve. Announcements of another run
(or of none) are ignored.

Not covered: NCCL broadcast of weights, and deciding which version should be live (the trainer and
the orchestrator own that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Final
from urllib.parse import urlparse

import nats.errors
import nats.js.errors
from prometheus_client import Counter, Histogram

from offbeat.bus import Bus
from offbeat.v1 import policy_pb2
from offbeat.weights import ChunkDigests, NatsObjectWeightStore
from offbeat_inference.engine import Engine

log = logging.getLogger("offbeat.inference.weights")

APPLIED = Counter("offbeat_inference_weight_updates_total", "Weight versions applied or refused", ["outcome"])
APPLY_SECONDS = Histogram(
    "offbeat_inference_weight_apply_seconds",
    "Fetch + verify + apply of one weight version",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600),
)
BUS_ERRORS: Final = (nats.errors.Error, nats.js.errors.Error, TimeoutError, ConnectionError)
PUBLISH_BACKOFF_S: Final = (0.2, 0.5, 1.0, 2.0)


class WeightFollower:
    def __init__(
        self, bus: Bus, engine: Engine, *, replica: str, weights_dir: Path, head_poll_s: float = 5.0
    ) -> None:
        self.bus = bus
        self.engine = engine
        self.replica = replica
        self.weights_dir = weights_dir
        self.head_poll_s = head_poll_s
        self.applies = 0
        self._head_seen: int | None = None
        """Version of the KV head last read: the poll acts only when the head moves."""
        self._stop = asyncio.Event()
        self.last: policy_pb2.PolicyLive | None = None
        self._pending: policy_pb2.WeightVersion | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sub: object = None
        self._stores: dict[str, NatsObjectWeightStore] = {}

    async def start(self) -> None:
        """Subscribe, then catch up with the KV head (applied before this returns)."""
        self._sub = await self.bus.subscribe(
            self.bus.subjects.policy_weights, policy_pb2.WeightVersion, self._on
        )
        head = await self.bus.get_head()
        self._head_seen = head.version if head is not None else None
        if head is not None and head.version != self.engine.version:
            await self.apply(head)
        elif self.last is None:
            await self._publish(self.engine.version, ok=True, error="", apply_s=0.0)

    async def _on(self, announcement: policy_pb2.WeightVersion) -> None:
        if announcement.run_id != self.bus.run_id:
            log.error("ignoring weights announced for run %r", announcement.run_id)
            return
        self._pending = announcement
        self._idle.clear()
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Apply announcements (and a moved head) until `stop` is set."""
        self._stop = stop
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                waking = asyncio.create_task(self._wake.wait())
                await asyncio.wait(
                    {waking, stopping}, timeout=self.head_poll_s, return_when=asyncio.FIRST_COMPLETED
                )
                woken = waking.done()
                waking.cancel()
                self._wake.clear()
                if not woken and not stop.is_set():
                    await self._poll_head()
                while self._pending is not None and not stop.is_set():
                    announcement, self._pending = self._pending, None
                    if announcement.version != self.engine.version:
                        try:
                            await self.apply(announcement)
                        except Exception:  # the follower must outlive any one version
                            log.exception("applying version %d failed", announcement.version)
                self._idle.set()
        finally:
            stopping.cancel()

    async def _poll_head(self) -> None:
        """Apply the KV head if it moved to a version this replica does not serve (an announcement
        missed while disconnected)."""
        try:
            head = await self.bus.get_head()
        except BUS_ERRORS as exc:
            log.warning("could not read the policy head (%r)", exc)
            return
        if head is None or head.version == self._head_seen:
            return
        self._head_seen = head.version
        if head.version != self.engine.version and self._pending is None:
            log.warning("head moved to version %d without an announcement here; applying it", head.version)
            self._pending = head

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def apply(self, wv: policy_pb2.WeightVersion) -> policy_pb2.PolicyLive:
        """Fetch, verify and apply one version; publish and return the PolicyLive that says so."""
        started = time.perf_counter()
        fetched: Path | None = None
        try:
            if wv.format and wv.format != "safetensors":
                raise ValueError(f"format {wv.format!r} is not supported (safetensors only)")
            # by its chunk digests where the announcement has them: a fetched copy as it was
            # received, a file read in place by the engine as it reads it
            chunks = ChunkDigests(wv.chunk_bytes, tuple(wv.chunk_blake3)) if wv.chunk_bytes else None
            path, fetched = await self._fetch(wv, chunks)
            in_place = fetched is None
            applied = await self.engine.update_weights(
                path,
                wv.version,
                sha256=wv.sha256 if in_place else None,
                chunks=chunks if in_place else None,
            )
        except Exception as exc:  # any failure is reported as data; the old weights keep serving
            error = f"{type(exc).__name__}: {exc}"
            log.error("version %d refused: %s", wv.version, error)
            APPLIED.labels("refused").inc()
            return await self._publish(
                wv.version, ok=False, error=error, apply_s=time.perf_counter() - started
            )
        finally:
            if fetched is not None:
                fetched.unlink(missing_ok=True)
        total = time.perf_counter() - started
        APPLIED.labels("applied").inc()
        APPLY_SECONDS.observe(total)
        log.info(
            "version %d live (apply %.3fs, fetch+verify+apply %.3fs)", wv.version, applied.apply_s, total
        )
        return await self._publish(wv.version, ok=True, error="", apply_s=applied.apply_s)

    async def _fetch(
        self, wv: policy_pb2.WeightVersion, chunks: ChunkDigests | None
    ) -> tuple[Path, Path | None]:
        """The local file to load, and that same path again if it is a verified copy of ours (to
        delete after); a file read in place is not verified yet."""
        parsed = urlparse(wv.uri)
        if parsed.scheme == "file":
            return Path(parsed.path), None
        if parsed.scheme == "nats":
            store = self._stores.get(parsed.netloc)
            if store is None:
                store = self._stores[parsed.netloc] = NatsObjectWeightStore(self.bus.js, parsed.netloc)
            dest = self.weights_dir / f"v{wv.version:06d}-{wv.sha256[:12]}.safetensors"
            await store.fetch(wv.uri, dest, sha256=wv.sha256, chunks=chunks)
            return dest, dest
        raise ValueError(f"unsupported weight uri {wv.uri!r} (file:// or nats://)")

    async def _publish(self, version: int, *, ok: bool, error: str, apply_s: float) -> policy_pb2.PolicyLive:
        """Publish the outcome, retrying through a NATS outage (the orchestrator waits for it)."""
        live = policy_pb2.PolicyLive(
            run_id=self.bus.run_id,
            version=version,
            replica=self.replica,
            ok=ok,
            error=error,
            apply_s=apply_s,
            live_at=time.time(),
        )
        self.applies += 1
        self.last = live
        msg_id = f"live:{self.replica}:{version}:{self.applies}"
        attempt = 0
        while True:
            try:
                await self.bus.publish(self.bus.subjects.policy_live, live, msg_id=msg_id)
                return live
            except BUS_ERRORS as exc:
                if self._stop.is_set():
                    log.error("stopping before PolicyLive of version %d was published (%r)", version, exc)
                    return live
                delay = PUBLISH_BACKOFF_S[min(attempt, len(PUBLISH_BACKOFF_S) - 1)]
                attempt += 1
                log.warning("publishing PolicyLive of version %d failed (%r); retrying", version, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()  # type: ignore[attr-defined]
