"""Weight stores: where a policy version's safetensors file lives between trainer and inference.

A version is published only after its file is completely written and checksummed, so a store's
`put` takes a finished local file and returns its URI, sha256 and size; `fetch` writes it to a
local path and verifies the checksum (a mismatch raises `ChecksumError` and leaves nothing behind).

A file's sha256 is one sequential pass (about 1.2 GB/s a core): 13 s for the weights of a 7B model.
So `put` also returns `ChunkDigests`, the BLAKE3 digest of each 1-16 MiB chunk of the file
(`chunk_size_for`), which a reader verifies on all its cores at once (`verify_chunks`); the
announcement carries both. BLAKE3 is a cryptographic hash like sha256 (what Hugging Face's Xet
storage addresses chunks by) and about four times faster a core: the 7B's chunks verify in about
2 s on 2 cores, less on more.

- `FileWeightStore` (`file:///root/...`): a shared filesystem path, what a cluster mounts
  (ReadWriteMany). Files are written under a temporary name and renamed into place; on the
  put file's own filesystem the store's file is a hard link to it, not a copy (the trainer never
  writes a weights file again once it is put, and neither may any other caller).
- `NatsObjectWeightStore` (`nats://bucket/name`): the NATS object store, zero extra
  infrastructure for small models; reads stream into a file (hashed as they are written), never
  into memory.

Not covered: NCCL broadcast from trainer to inference ranks (a cluster addition; the announcement
still goes over the bus) and weight formats other than safetensors.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

import blake3

CHUNK: Final = 8 * 1024 * 1024
CHUNK_BYTES: Final = 1024 * 1024
"""Object-store chunk size for puts (at most the server's max_payload)."""
FETCH_BATCH_BYTES: Final = 32 * 1024 * 1024
"""About this much is requested per pull while the previous batch is written and hashed."""
FETCH_TIMEOUT_S: Final = 30.0
"""Longest wait for one batch of chunks before a fetch fails."""
MIN_DIGEST_CHUNK_BYTES: Final = 1024 * 1024
MAX_DIGEST_CHUNK_BYTES: Final = 16 * 1024 * 1024
"""Chunk digests cover between these many bytes each: the largest keeps the digests of a 70B
model's weights (about 9,000) a small part of the announcement."""
DIGEST_CHUNKS: Final = 64
"""Chunks a file is cut into where those bounds allow: enough to keep `HASH_THREADS` busy, and the
last chunk's hash, which cannot start before all of it is read, short."""
HASH_THREADS: Final = 32
"""Most threads hashing chunks at once (a 16 MiB chunk takes ~4 ms a core)."""


class ChecksumError(ValueError):
    """Fetched weights do not match the announced sha256."""


@dataclass(frozen=True)
class ChunkDigests:
    """The BLAKE3 digest of each consecutive `chunk_bytes` of a file (the last chunk may be shorter)."""

    chunk_bytes: int
    digests: tuple[bytes, ...]

    def count_for(self, size: int) -> int:
        """How many chunks a file of `size` bytes has in these."""
        return chunk_count(size, self.chunk_bytes)


def chunk_count(size: int, chunk_bytes: int) -> int:
    """How many chunks of `chunk_bytes` a file of `size` bytes has (an empty file has one, empty)."""
    return max(1, -(-size // chunk_bytes))


@dataclass(frozen=True)
class StoredWeights:
    uri: str
    sha256: str
    size_bytes: int
    chunks: ChunkDigests | None = None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)  # one buffer for the whole file, not a new bytes object per read
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def verify(path: str | Path, sha256: str) -> None:
    check_sha256(path, sha256_file(path), sha256)


def check_sha256(path: str | Path, actual: str, announced: str) -> None:
    """`ChecksumError` unless the hex digest `actual` is the announced one."""
    if actual != announced:
        raise ChecksumError(f"{path}: sha256 {actual[:12]}… does not match the announced {announced[:12]}…")


_POOL: ThreadPoolExecutor | None = None


def hash_pool() -> ThreadPoolExecutor:
    """Threads that hash weight files and their chunks: one per core this process may run on, at
    most `HASH_THREADS` (hashlib and blake3 release the GIL on large buffers)."""
    global _POOL
    if _POOL is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        _POOL = ThreadPoolExecutor(max_workers=min(HASH_THREADS, cores), thread_name_prefix="offbeat-hash")
    return _POOL


def _chunk_hasher() -> blake3.blake3:
    """A new digest of the kind a chunk digest is (one thread: the pool runs the chunks in parallel)."""
    return blake3.blake3()


def _chunk_digest(path: str | Path, offset: int, length: int) -> bytes:
    digest = _chunk_hasher()
    buffer = bytearray(min(CHUNK, max(1, length)))
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while length > 0:
            n = os.preadv(f.fileno(), [view[:length]], offset)
            if not n:
                break  # the file shrank: the digest tells
            digest.update(view[:n])
            offset += n
            length -= n
    return digest.digest()


def chunk_size_for(size: int) -> int:
    """The chunk size for a file of `size` bytes: a power of two near `size / DIGEST_CHUNKS`,
    within the bounds."""
    chunk = MIN_DIGEST_CHUNK_BYTES
    while chunk * DIGEST_CHUNKS < size and chunk < MAX_DIGEST_CHUNK_BYTES:
        chunk *= 2
    return chunk


def chunk_digests(path: str | Path, chunk_bytes: int | None = None) -> ChunkDigests:
    """The chunk digests of a file (chunks of `chunk_size_for` its size unless given), its chunks
    hashed in parallel."""
    size = os.stat(path).st_size
    chunk_bytes = chunk_bytes or chunk_size_for(size)
    starts = [i * chunk_bytes for i in range(chunk_count(size, chunk_bytes))]
    digests = hash_pool().map(lambda start: _chunk_digest(path, start, chunk_bytes), starts)
    return ChunkDigests(chunk_bytes, tuple(digests))


def file_digests(path: str | Path, chunk_bytes: int | None = None) -> tuple[str, ChunkDigests]:
    """The file's sha256 and its chunk digests: the sequential pass goes to the pool first, the
    chunks after it, so this takes about as long as `sha256_file` alone where there are cores to
    spare."""
    whole = hash_pool().submit(sha256_file, path)
    chunks = chunk_digests(path, chunk_bytes)
    return whole.result(), chunks


def verify_chunks(path: str | Path, chunks: ChunkDigests) -> None:
    """`ChecksumError` unless the file is exactly the bytes of `chunks` (its chunks hashed in
    parallel)."""
    check_chunk_count(path, os.stat(path).st_size, chunks)
    actual = chunk_digests(path, chunks.chunk_bytes)
    check_chunks(path, actual.digests, chunks.digests)


def check_chunk_count(path: str | Path, size: int, chunks: ChunkDigests) -> None:
    """`ChecksumError` unless a file of `size` bytes has as many chunks as `chunks` has digests."""
    if chunks.chunk_bytes <= 0 or chunks.count_for(size) != len(chunks.digests):
        count = chunks.count_for(size) if chunks.chunk_bytes > 0 else "no"
        raise ChecksumError(
            f"{path}: {size} bytes make {count} chunks of {chunks.chunk_bytes} bytes, "
            f"the announcement has {len(chunks.digests)} chunk digests"
        )


def check_chunks(path: str | Path, actual: Sequence[bytes], announced: Sequence[bytes]) -> None:
    """`ChecksumError` naming the first chunk whose digest is not the announced one."""
    for i, (got, want) in enumerate(zip(actual, announced, strict=True)):
        if got != want:
            raise ChecksumError(
                f"{path}: chunk {i} has BLAKE3 {got.hex()[:12]}…, the announced is {want.hex()[:12]}…"
            )


class ChunkHashing:
    """Bytes fed in file order, checked against the announced `chunks`: each chunk goes to the hash
    pool as soon as all of it has been fed, so hashing overlaps whatever produces the bytes (a read,
    a download). The fed buffers must not change until `wait` returns.

    `ChecksumError` at once if a file of `size` bytes cannot have as many chunks as were announced,
    before a byte is read or received."""

    def __init__(self, chunks: ChunkDigests, path: str | Path, size: int) -> None:
        check_chunk_count(path, size, chunks)
        self.chunks = chunks
        self._pieces: list[memoryview] = []
        self._filled = 0
        self._hashed: list[Future[bytes]] = []

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        size = self.chunks.chunk_bytes
        while len(view):
            piece, view = view[: size - self._filled], view[size - self._filled :]
            self._pieces.append(piece)
            self._filled += len(piece)
            if self._filled == size:
                self._submit()

    def _submit(self) -> None:
        pieces, self._pieces, self._filled = self._pieces, [], 0

        def run() -> bytes:
            digest = _chunk_hasher()
            for piece in pieces:
                digest.update(piece)
            return digest.digest()

        self._hashed.append(hash_pool().submit(run))

    def wait(self) -> None:
        """Until every fed byte is hashed (the short last chunk, or an empty file's one chunk,
        submitted now); never raises: `check` reports."""
        if self._pieces or not self._hashed:
            self._submit()
        for future in self._hashed:
            future.exception()

    def check(self, path: str | Path) -> None:
        """`ChecksumError` unless what was fed is exactly the announced bytes (after `wait`)."""
        announced = self.chunks.digests
        if len(self._hashed) != len(announced):
            raise ChecksumError(
                f"{path}: read {len(self._hashed)} chunks, the announcement has {len(announced)}"
            )
        check_chunks(path, [f.result() for f in self._hashed], announced)


class WeightStore(ABC):
    """Where versions' weight files are put by the trainer and fetched by inference."""

    @abstractmethod
    async def put(self, local: Path, *, run_id: str, version: int) -> StoredWeights:
        """Store a finished file as `version`; return where it is and its checksum."""

    @abstractmethod
    async def fetch(self, uri: str, dest: Path, *, sha256: str, chunks: ChunkDigests | None = None) -> Path:
        """Write the weights at `uri` to `dest` (a file path), verified against `chunks` (on every
        core) where given, else against `sha256`."""

    @abstractmethod
    async def delete(self, uri: str) -> None:
        """Remove the weights at `uri`; one already gone is not an error."""

    def local_path(self, uri: str) -> Path | None:
        """A path inference may read in place (no copy), when the store has one."""
        return None


class FileWeightStore(WeightStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    async def put(self, local: Path, *, run_id: str, version: int) -> StoredWeights:
        target = self.root / run_id / f"v{version:06d}" / "model.safetensors"
        return await asyncio.to_thread(self._put, local, target)

    @staticmethod
    def _put(local: Path, target: Path) -> StoredWeights:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        tmp.unlink(missing_ok=True)
        try:  # the trainer's file is final once put: a second name costs no copy
            os.link(local, tmp)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(local, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest, chunks = file_digests(tmp)
        os.replace(tmp, target)
        return StoredWeights(
            uri=target.as_uri(), sha256=digest, size_bytes=target.stat().st_size, chunks=chunks
        )

    def local_path(self, uri: str) -> Path | None:
        return Path(urlparse(uri).path)

    async def delete(self, uri: str) -> None:
        """Delete one version's directory (`<root>/<run>/v<version>/`), and nothing else: the uri
        comes from the trainer's saved state, and a path that is not exactly a version's file of
        this store (`..` in it, a run's or the store's own directory) is refused."""
        path = Path(urlparse(uri).path).resolve()
        version_dir = path.parent
        if (
            path.name != "model.safetensors"
            or version_dir.parent.parent != self.root
            or not version_dir.name.startswith("v")
        ):
            raise ValueError(f"{uri} is not a version's weights under {self.root}")
        await asyncio.to_thread(shutil.rmtree, version_dir, True)

    async def fetch(self, uri: str, dest: Path, *, sha256: str, chunks: ChunkDigests | None = None) -> Path:
        source = self.local_path(uri)
        assert source is not None
        await asyncio.to_thread(_copy_verified, source, dest, sha256, chunks)
        return dest


def _copy_verified(source: Path, dest: Path, sha256: str, chunks: ChunkDigests | None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".partial")
    shutil.copyfile(source, tmp)
    try:
        if chunks is not None:
            verify_chunks(tmp, chunks)
        else:
            verify(tmp, sha256)
    except ChecksumError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)


class NatsObjectWeightStore(WeightStore):
    """Weights in a JetStream object store bucket of the run's NATS server.

    Objects are plain object-store objects (any NATS client reads them), in chunks of
    `chunk_bytes` (at most the server's max_payload): fewer, larger messages than the client's
    128 KiB default. `fetch` reads the chunks with a pull consumer of its own, in batches, and
    writes and hashes each batch in a thread while the next one is on the wire: one pass, the
    bytes written compared with the announced chunk digests (each chunk hashed on the hash pool
    as soon as it has arrived) or, without them, with the announced sha256. (The client's `get`
    is not used: its ordered consumer answers flow control only every 250 ms, which stalls a large
    object for minutes, and it hashes on the event loop.)
    """

    def __init__(
        self,
        js: Any,
        bucket: str,
        *,
        max_bytes: int = -1,
        chunk_bytes: int = CHUNK_BYTES,
        batch_bytes: int = FETCH_BATCH_BYTES,
        fetch_timeout_s: float = FETCH_TIMEOUT_S,
    ) -> None:
        """`max_bytes` bounds the bucket; -1 (no bound) reserves nothing, where a bound reserves that
        much of the server's JetStream storage up front (and fails on a server with less).
        `fetch_timeout_s` bounds the wait for each batch of chunks."""
        self.js = js
        self.bucket = bucket
        self.max_bytes = max_bytes
        self.chunk_bytes = chunk_bytes
        self.batch_bytes = batch_bytes
        self.fetch_timeout_s = fetch_timeout_s
        self._store: Any = None

    async def _obs(self) -> Any:
        """The bucket, created if missing; one that exists is used as it is (whoever made it)."""
        if self._store is None:
            from nats.js.api import ObjectStoreConfig, StorageType
            from nats.js.errors import BadRequestError

            try:
                self._store = await self.js.create_object_store(
                    self.bucket,
                    config=ObjectStoreConfig(
                        description="offbeat policy weights",
                        storage=StorageType.FILE,
                        max_bytes=self.max_bytes,
                    ),
                )
            except BadRequestError:  # exists with another configuration
                self._store = await self.js.object_store(self.bucket)
        return self._store

    async def put(self, local: Path, *, run_id: str, version: int) -> StoredWeights:
        from nats.js.api import ObjectMeta, ObjectMetaOptions

        name = f"{run_id}/v{version:06d}/model.safetensors"
        obs = await self._obs()
        chunk = self.chunk_bytes  # offbeat's servers allow >= 1 MiB (`[bus] max_payload_bytes`)

        async def send() -> Any:
            with open(local, "rb") as f:  # the client hashes what it sends: its digest is the file's
                return await obs.put(
                    name, f, meta=ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=chunk))
                )

        info, chunks = await asyncio.gather(send(), asyncio.to_thread(chunk_digests, local))
        return StoredWeights(
            uri=f"nats://{self.bucket}/{name}",
            sha256=_digest_hex(info.digest),
            size_bytes=info.size,
            chunks=chunks,
        )

    def _object_name(self, uri: str) -> str:
        parsed = urlparse(uri)
        if parsed.scheme != "nats" or parsed.netloc != self.bucket:
            raise ValueError(f"{uri} is not in bucket {self.bucket}")
        return parsed.path.lstrip("/")

    async def delete(self, uri: str) -> None:
        from nats.js.errors import NotFoundError

        name = self._object_name(uri)
        with contextlib.suppress(NotFoundError):
            await (await self._obs()).delete(name)

    async def fetch(self, uri: str, dest: Path, *, sha256: str, chunks: ChunkDigests | None = None) -> Path:
        info = await (await self._obs()).get_info(self._object_name(uri))
        if info.is_link():
            raise ValueError(f"{uri} is an object-store link, not weights")
        if _digest_hex(info.digest) != sha256:
            raise ChecksumError(
                f"{uri}: stored sha256 {_digest_hex(info.digest)[:12]}… is not the announced {sha256[:12]}…"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".partial")
        try:
            whole = hashlib.sha256()
            hashing = ChunkHashing(chunks, uri, info.size) if chunks is not None else None
            try:
                size = await self._receive(info, tmp, hashing.feed if hashing else whole.update)
            finally:  # the hash pool is done with the received chunks before they are dropped
                if hashing is not None:
                    await asyncio.to_thread(hashing.wait)
            if size != info.size:
                raise ChecksumError(f"{uri}: received {size} bytes, the stored object has {info.size}")
            if hashing is not None:
                hashing.check(uri)
            else:
                check_sha256(uri, whole.hexdigest(), sha256)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, dest)
        return dest

    async def _receive(self, info: Any, path: Path, feed: Callable[[bytes], object]) -> int:
        """Every chunk of `info` into `path`, in order, each also fed to `feed`; the bytes written."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        stream = f"OBJ_{self.bucket}"
        consumer = f"offbeat-fetch-{uuid.uuid4().hex}"
        chunk = (info.options.max_chunk_size if info.options else 0) or self.chunk_bytes
        batch = max(1, self.batch_bytes // chunk)
        await self.js.add_consumer(
            stream,
            config=ConsumerConfig(
                name=consumer,
                filter_subject=f"$O.{self.bucket}.C.{info.nuid}",
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=max(60.0, 4 * self.fetch_timeout_s),  # the server's cleanup if we die
                mem_storage=True,
                num_replicas=1,
            ),
        )
        size = 0
        received = 0
        try:
            sub = await self.js.pull_subscribe_bind(
                consumer=consumer, stream=stream, pending_bytes_limit=4 * batch * chunk + self.batch_bytes
            )
            with open(path, "wb") as f:

                def sink(chunks: list[bytes]) -> None:
                    for data in chunks:
                        f.write(data)
                        feed(data)

                writing: asyncio.Future[None] | None = None
                try:
                    while received < info.chunks:
                        msgs = await sub.fetch(
                            batch=min(batch, info.chunks - received), timeout=self.fetch_timeout_s
                        )
                        chunks = [m.data for m in msgs]
                        received += len(chunks)
                        size += sum(len(c) for c in chunks)
                        if writing is not None:
                            await writing
                        writing = asyncio.ensure_future(asyncio.to_thread(sink, chunks))
                finally:  # the file stays open until the last write is done, even on failure
                    if writing is not None:
                        await writing
            await sub.unsubscribe()
        finally:
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(stream, consumer)
        return size


def _digest_hex(digest: str) -> str:
    """The hex sha256 of an object-store digest (`SHA-256=<urlsafe base64>`)."""
    _, _, b64 = digest.partition("=")
    return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()


def open_store(uri: str, *, js: Any = None) -> WeightStore:
    """The store for a base URI: `file:///shared/weights` or `nats://bucket` (needs `js`)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return FileWeightStore(parsed.path)
    if parsed.scheme == "nats":
        if js is None:
            raise ValueError("a nats:// weight store needs a JetStream context")
        return NatsObjectWeightStore(js, parsed.netloc)
    raise ValueError(f"unknown weight store {uri!r}: use file:///path or nats://bucket")
