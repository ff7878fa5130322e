"""Weight stores: where a policy version's safetensors file lives between trainer and inference.

A version is published only after its file is completely written and checksummed, so a store's
`put` takes a finished local file and returns its URI, sha256 and size; `fetch` writes it to a
local path and verifies the checksum (a mismatch raises `ChecksumError` and leaves nothing behind).

- `FileWeightStore` (`file:///root/...`): a shared filesystem path, what a cluster mounts
  (ReadWriteMany). Files are written under a temporary name and renamed into place.
- `NatsObjectWeightStore` (`nats://bucket/name`): the NATS object store, zero extra
  infrastructure for small models; reads stream into a file (`writeinto`), never into memory.

Not covered: NCCL broadcast from trainer to inference ranks (a cluster addition; the announcement
still goes over the bus) and weight formats other than safetensors.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHUNK = 8 * 1024 * 1024


class ChecksumError(ValueError):
    """Fetched weights do not match the announced sha256."""


@dataclass(frozen=True)
class StoredWeights:
    uri: str
    sha256: str
    size_bytes: int


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str | Path, sha256: str) -> None:
    actual = sha256_file(path)
    if actual != sha256:
        raise ChecksumError(f"{path}: sha256 {actual[:12]}… does not match the announced {sha256[:12]}…")


class WeightStore(ABC):
    """Where versions' weight files are put by the trainer and fetched by inference."""

    @abstractmethod
    async def put(self, local: Path, *, run_id: str, version: int) -> StoredWeights:
        """Store a finished file as `version`; return where it is and its checksum."""

    @abstractmethod
    async def fetch(self, uri: str, dest: Path, *, sha256: str) -> Path:
        """Write the weights at `uri` to `dest` (a file path), verified against `sha256`."""

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
        shutil.copyfile(local, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, target)
        return StoredWeights(uri=target.as_uri(), sha256=digest, size_bytes=target.stat().st_size)

    def local_path(self, uri: str) -> Path | None:
        return Path(urlparse(uri).path)

    async def fetch(self, uri: str, dest: Path, *, sha256: str) -> Path:
        source = self.local_path(uri)
        assert source is not None
        await asyncio.to_thread(_copy_verified, source, dest, sha256)
        return dest


def _copy_verified(source: Path, dest: Path, sha256: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".partial")
    shutil.copyfile(source, tmp)
    try:
        verify(tmp, sha256)
    except ChecksumError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)


class NatsObjectWeightStore(WeightStore):
    """Weights in a JetStream object store bucket of the run's NATS server."""

    def __init__(self, js: Any, bucket: str, *, max_bytes: int = 64 * 1024**3) -> None:
        self.js = js
        self.bucket = bucket
        self.max_bytes = max_bytes
        self._store: Any = None

    async def _obs(self) -> Any:
        if self._store is None:
            from nats.js.api import ObjectStoreConfig, StorageType

            self._store = await self.js.create_object_store(
                self.bucket,
                config=ObjectStoreConfig(
                    description="offbeat policy weights", storage=StorageType.FILE, max_bytes=self.max_bytes
                ),
            )
        return self._store

    async def put(self, local: Path, *, run_id: str, version: int) -> StoredWeights:
        digest = await asyncio.to_thread(sha256_file, local)
        name = f"{run_id}/v{version:06d}/model.safetensors"
        obs = await self._obs()
        with open(local, "rb") as f:
            await obs.put(name, f)
        return StoredWeights(
            uri=f"nats://{self.bucket}/{name}", sha256=digest, size_bytes=local.stat().st_size
        )

    async def fetch(self, uri: str, dest: Path, *, sha256: str) -> Path:
        parsed = urlparse(uri)
        if parsed.scheme != "nats" or parsed.netloc != self.bucket:
            raise ValueError(f"{uri} is not in bucket {self.bucket}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".partial")
        obs = await self._obs()
        with open(tmp, "wb") as f:
            await obs.get(parsed.path.lstrip("/"), writeinto=f)
        try:
            await asyncio.to_thread(verify, tmp, sha256)
        except ChecksumError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, dest)
        return dest


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
