"""Reading a safetensors weight file for an update: one read into memory, hashed as it is read.

`read_safetensors` reads the file once, each tensor straight into memory of its own, so the
tensors can become the model's parameters without another copy. When given the announced sha256,
a second thread hashes each piece as soon as it is read (hashlib and file reads release the GIL)
while the reading thread goes on reading; the digest is of exactly the bytes that the tensors
hold, so a file changed after it was hashed cannot slip in.
Given the announced chunk digests instead (`offbeat.weights.ChunkDigests`, BLAKE3), each chunk is
handed to the hash pool as soon as it has been read, so the chunks are verified on every core at
once, each about four times faster than by sha256, while the reading goes on.
A digest that differs raises `offbeat.weights.ChecksumError`, before (and instead of) any error
about the file's contents: a file that is not the announced one is refused as such.

Costs: about one hash pass over the file (the read overlaps it; with chunk digests, a BLAKE3 pass
divided among the cores) and, for the duration of an update, a second copy of the weights in
memory (the staging buffer next to the live parameters).

Not covered: formats other than safetensors, and what the tensors must look like to fit a model
(the engine checks names and shapes).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Final

import torch

from offbeat.weights import ChunkDigests, ChunkHashing, check_sha256

READ_CHUNK_BYTES: Final = 1024 * 1024
"""Largest read: the hasher starts on a large tensor while the rest of it is read."""
HASH_BATCH_BYTES: Final = 512 * 1024
"""Bytes read before they are handed to the hasher (the hashing left after the last read)."""
THREAD_HASH_BYTES: Final = 32 * 1024 * 1024
"""Smaller files are hashed by the reading thread itself, each piece right after it is read: the
read is a fraction of the hash there, and two threads handing pieces to each other lose more than
that on a busy machine."""
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offbeat-sha256")
"""One worker: the chunks of a file are hashed in the order they were submitted."""

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(
    path: Path,
    *,
    sha256: str | None = None,
    chunks: ChunkDigests | None = None,
    reuse: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, read once into memory, each into a tensor of its own.

    With `sha256`, every byte of the file is hashed (in file order, on a second thread for a large
    file) while the rest is read; `ChecksumError` if they are not the announced ones. With `chunks`
    (which then take the place of `sha256`), every chunk is verified on the hash pool as soon as it
    has been read.

    `ValueError` (or `OSError`) for a file that is not safetensors: the header is checked
    completely (dtypes, shapes against byte ranges, ranges inside the file) before any tensor is
    read.

    `reuse`: flat uint8 CPU tensors, each the only user of its memory, that this may overwrite: a
    tensor of the file with as many bytes as `reuse[name]` is read into it rather than into new
    memory (new memory costs a page fault per 4 KiB, about as much as the read itself).
    """
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        hashing: _Hashing | ChunkHashing
        if chunks is not None:
            hashing = ChunkHashing(chunks, path, size)
        else:
            hashing = _Hashing(sha256, inline=size < THREAD_HASH_BYTES)
        try:
            try:
                tensors = _read(f, size, hashing, reuse or {})
                problem: ValueError | None = None
            except (ValueError, KeyError, TypeError) as exc:  # the header is whatever the file says
                tensors = {}
                problem = exc if isinstance(exc, ValueError) else ValueError(f"malformed header: {exc!r}")
            if chunks is not None or sha256 is not None:  # unread: trailing bytes, or all after a problem
                while data := f.read(READ_CHUNK_BYTES):
                    hashing.feed(data)
        finally:
            hashing.wait()  # the hasher is done with every buffer before this returns or raises
    hashing.check(path)
    if problem is not None:
        raise problem
    return tensors


def _read(
    f: io.FileIO, size: int, hashing: _Hashing | ChunkHashing, reuse: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    head = _read_exact(f, 8, hashing)
    if len(head) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise ValueError(f"header of {n} bytes does not fit in {size}")
    raw_header = _read_exact(f, n, hashing)
    header = json.loads(raw_header)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    base = 8 + n
    plan: list[tuple[int, int, str, torch.dtype, list[int]]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{name}: dtype {info['dtype']} is not supported")
        begin, stop = info["data_offsets"]
        shape = [int(d) for d in info["shape"]]
        if not 0 <= begin <= stop <= size - base or stop - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{name}: byte range {begin}..{stop} does not hold {shape} {info['dtype']}")
        plan.append((base + begin, base + stop, name, dtype, shape))
    plan.sort()
    pos = base
    tensors: dict[str, torch.Tensor] = {}
    for begin, stop, name, dtype, shape in plan:
        if begin < pos:
            raise ValueError(f"{name}: byte range overlaps another tensor's")
        if begin > pos:  # padding between tensors (the writer leaves none, the format allows it)
            _read_exact(f, begin - pos, hashing)
        # a tensor of its own (not a view of one buffer for the file), so that each can be given
        # back as `reuse` once it no longer serves
        data = reuse.get(name)
        if data is None or data.numel() != stop - begin:
            data = torch.empty(stop - begin, dtype=torch.uint8)
        _read_into(f, data.numpy().data, hashing)
        tensors[name] = data.view(dtype).view(shape)
        pos = stop
    return tensors


def _read_exact(f: io.FileIO, n: int, hashing: _Hashing | ChunkHashing) -> bytes:
    data = f.read(n) if n else b""
    while len(data) < n and (more := f.read(n - len(data))):
        data += more
    hashing.feed(data)
    return data


def _read_into(f: io.FileIO, view: memoryview, hashing: _Hashing | ChunkHashing) -> None:
    pos = 0
    while pos < len(view):
        n = f.readinto(view[pos : pos + READ_CHUNK_BYTES])
        if not n:
            raise ValueError("the file ended inside a tensor")
        hashing.feed(view[pos : pos + n])
        pos += n


class _Hashing:
    """sha256 of what is fed, in order, on the hasher thread (a no-op without a digest to check).

    Pieces are handed over in batches of about `HASH_BATCH_BYTES`: fewer thread hand-offs for
    files of many small tensors, and the hasher still starts long before the reading ends."""

    def __init__(self, sha256: str | None, *, inline: bool = False) -> None:
        self.sha256 = sha256
        self.active = sha256 is not None
        self.inline = inline
        self._digest = hashlib.sha256()
        self._pending: list[bytes | memoryview] = []
        self._pending_bytes = 0
        self._last: Future[None] | None = None

    def feed(self, data: bytes | memoryview) -> None:
        if self.active and len(data):
            if self.inline:
                self._digest.update(data)
                return
            self._pending.append(data)
            self._pending_bytes += len(data)
            if self._pending_bytes >= HASH_BATCH_BYTES:
                self._submit()

    def _submit(self) -> None:
        pieces, self._pending, self._pending_bytes = self._pending, [], 0
        update = self._digest.update

        def run() -> None:
            for piece in pieces:
                update(piece)

        self._last = _HASHER.submit(run)

    def wait(self) -> None:
        if self._pending:
            self._submit()
        if self._last is not None:
            self._last.result()

    def check(self, path: Path) -> None:
        if self.sha256 is not None:
            check_sha256(path, self._digest.hexdigest(), self.sha256)
