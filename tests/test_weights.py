"""Weight stores against a real nats-server: whole files or nothing, and no leftovers."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import blake3
import nats
import pytest

from offbeat.infra import NatsServer
from offbeat.weights import (
    ChecksumError,
    ChunkDigests,
    FileWeightStore,
    NatsObjectWeightStore,
    chunk_digests,
    chunk_size_for,
    file_digests,
    verify_chunks,
)

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


@pytest.fixture
async def js(nats_url: str):  # type: ignore[no-untyped-def]
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


async def test_nats_store_round_trips_a_file_of_many_chunks(js, run_id: str, tmp_path: Path) -> None:
    source = random_file(tmp_path / "w.safetensors", 5 * MIB + 12345)
    store = NatsObjectWeightStore(js, f"w_{run_id}", chunk_bytes=MIB, batch_bytes=2 * MIB)
    stored = await store.put(source, run_id=run_id, version=3)
    assert stored.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert stored.size_bytes == source.stat().st_size
    info = await (await js.object_store(f"w_{run_id}")).get_info(f"{run_id}/v000003/model.safetensors")
    assert info.chunks == 6, f"{info.chunks} chunks of a 5 MiB file at 1 MiB each"

    fetched = await NatsObjectWeightStore(js, f"w_{run_id}").fetch(
        stored.uri, tmp_path / "out" / "v3.safetensors", sha256=stored.sha256
    )
    assert fetched.read_bytes() == source.read_bytes(), "the fetched file differs from the one put"
    assert not list(fetched.parent.glob("*.partial"))
    consumers = await js.consumers_info(f"OBJ_w_{run_id}")
    assert consumers == [], f"fetch left consumers behind: {[c.name for c in consumers]}"


async def test_nats_store_reads_objects_another_client_wrote(js, run_id: str, tmp_path: Path) -> None:
    # the nats client's own put: its default 128 KiB chunks
    source = random_file(tmp_path / "w.safetensors", MIB + 7)
    obs = await js.create_object_store(f"w_{run_id}")
    info = await obs.put("r/v000001/model.safetensors", source.read_bytes())
    assert info.chunks > 1
    fetched = await NatsObjectWeightStore(js, f"w_{run_id}").fetch(
        f"nats://w_{run_id}/r/v000001/model.safetensors",
        tmp_path / "v1.safetensors",
        sha256=hashlib.sha256(source.read_bytes()).hexdigest(),
    )
    assert fetched.read_bytes() == source.read_bytes()


async def test_nats_store_refuses_weights_that_are_not_the_announced_ones(
    js, run_id: str, tmp_path: Path
) -> None:
    store = NatsObjectWeightStore(js, f"w_{run_id}")
    stored = await store.put(random_file(tmp_path / "w", 2 * MIB), run_id=run_id, version=1)
    dest = tmp_path / "out" / "v1.safetensors"
    with pytest.raises(ChecksumError):
        await store.fetch(stored.uri, dest, sha256="0" * 64)
    assert not dest.parent.exists() or not any(dest.parent.iterdir()), "a refused fetch left files"


async def test_nats_store_with_chunks_gone_fails_within_its_timeout(js, run_id: str, tmp_path: Path) -> None:
    bucket = f"w_{run_id}"
    store = NatsObjectWeightStore(js, bucket, chunk_bytes=MIB, fetch_timeout_s=0.5)
    stored = await store.put(random_file(tmp_path / "w", 3 * MIB), run_id=run_id, version=1)
    info = await (await js.object_store(bucket)).get_info(f"{run_id}/v000001/model.safetensors")
    await js.purge_stream(f"OBJ_{bucket}", subject=f"$O.{bucket}.C.{info.nuid}")  # the data, not the meta
    dest = tmp_path / "v1.safetensors"
    started = time.monotonic()
    with pytest.raises(Exception) as failure:
        await store.fetch(stored.uri, dest, sha256=stored.sha256)
    assert time.monotonic() - started < 10, f"a fetch of missing chunks hung ({failure.value!r})"
    assert not dest.exists() and not dest.with_suffix(".partial").exists()


async def test_nats_store_needs_no_storage_reservation(tmp_path: Path, run_id: str) -> None:
    # a server with less JetStream storage than any fixed bucket bound we might pick
    server = NatsServer.start(tmp_path / "small", max_file_store_bytes=256 * MIB)
    try:
        nc = await nats.connect(server.url)
        store = NatsObjectWeightStore(nc.jetstream(), "weights")
        stored = await store.put(random_file(tmp_path / "w", MIB), run_id=run_id, version=1)
        assert stored.uri.startswith("nats://weights/")
        await nc.close()
    finally:
        server.stop()


async def test_file_store_puts_atomically_and_refuses_a_changed_file(tmp_path: Path, run_id: str) -> None:
    source = random_file(tmp_path / "w.safetensors", MIB + 3)
    store = FileWeightStore(tmp_path / "store")
    stored = await store.put(source, run_id=run_id, version=2)
    path = store.local_path(stored.uri)
    assert path is not None and path.read_bytes() == source.read_bytes()
    assert not list(path.parent.glob("*.partial"))
    path.write_bytes(b"tampered")  # the store's copy changed after it was announced
    with pytest.raises(ChecksumError):
        await store.fetch(stored.uri, tmp_path / "copy.safetensors", sha256=stored.sha256)
    assert not (tmp_path / "copy.safetensors").exists()


async def test_file_store_deletes_one_version_and_nothing_outside_it(tmp_path: Path, run_id: str) -> None:
    # the uri comes from the trainer's saved state: `..` once deleted a directory outside the store,
    # and a run's own directory (every version in it, rollback targets too) passed the check
    source = random_file(tmp_path / "w.safetensors", 1000)
    store = FileWeightStore(tmp_path / "store")
    kept = await store.put(source, run_id=run_id, version=1)
    gone = await store.put(source, run_id=run_id, version=2)
    victim = tmp_path / "outside" / "victim"
    victim.mkdir(parents=True)
    (victim / "model.safetensors").write_bytes(b"x")
    root = (tmp_path / "store").resolve()
    for uri in (
        (root / ".." / "outside" / "victim" / "model.safetensors").as_uri(),
        (root / run_id / "model.safetensors").as_uri(),
        (root / "model.safetensors").as_uri(),
        (root / run_id / "v000002" / "other.bin").as_uri(),
    ):
        with pytest.raises(ValueError, match="is not a version's weights"):
            await store.delete(uri)
    assert victim.exists() and (root / run_id / "v000001").exists() and (root / run_id / "v000002").exists()
    await store.delete(gone.uri)
    assert not (root / run_id / "v000002").exists()
    assert store.local_path(kept.uri).exists()  # type: ignore[union-attr]


async def test_both_stores_fetch_by_chunk_digests_and_refuse_bytes_that_are_not_theirs(
    js, run_id: str, tmp_path: Path
) -> None:
    source = random_file(tmp_path / "w.safetensors", 5 * MIB + 3)
    other = random_file(tmp_path / "x.safetensors", 5 * MIB + 3)  # same size, other bytes
    stores = [FileWeightStore(tmp_path / "store"), NatsObjectWeightStore(js, f"c_{run_id}", chunk_bytes=MIB)]
    for store in stores:
        name = type(store).__name__
        stored = await store.put(source, run_id=run_id, version=1)
        assert stored.chunks is not None
        small = chunk_digests(source, MIB)  # smaller chunks than the nats store's own, cut across them
        for chunks in (stored.chunks, small):
            fetched = await store.fetch(
                stored.uri, tmp_path / name / "v1.safetensors", sha256=stored.sha256, chunks=chunks
            )
            assert fetched.read_bytes() == source.read_bytes(), name
            fetched.unlink()
        # the right object (its sha256 matches) against another file's digests: refused by them
        dest = tmp_path / name / "refused.safetensors"
        with pytest.raises(ChecksumError, match="chunk 0 has BLAKE3"):
            await store.fetch(stored.uri, dest, sha256=stored.sha256, chunks=chunk_digests(other, MIB))
        with pytest.raises(ChecksumError, match="has 7 chunk digests"):
            await store.fetch(
                stored.uri, dest, sha256=stored.sha256, chunks=ChunkDigests(MIB, (*small.digests, b"x"))
            )
        assert not any((tmp_path / name).iterdir()), f"{name}: a refused fetch left files"


async def test_deleted_versions_are_gone_and_their_storage_freed(js, run_id: str, tmp_path: Path) -> None:
    source = random_file(tmp_path / "w.safetensors", 3 * MIB)
    bucket = f"d_{run_id}"
    stores = [FileWeightStore(tmp_path / "store"), NatsObjectWeightStore(js, bucket, chunk_bytes=MIB)]
    for store in stores:
        old = await store.put(source, run_id=run_id, version=1)
        kept = await store.put(source, run_id=run_id, version=2)
        await store.delete(old.uri)
        await store.delete(old.uri)  # already gone: not an error
        with pytest.raises(Exception):  # noqa: B017 (each store raises its own not-found error)
            await store.fetch(old.uri, tmp_path / "gone.safetensors", sha256=old.sha256)
        fetched = await store.fetch(
            kept.uri, tmp_path / f"{type(store).__name__}.safetensors", sha256=kept.sha256
        )
        assert fetched.read_bytes() == source.read_bytes()
    assert [p.name for p in (tmp_path / "store" / run_id).iterdir()] == ["v000002"]
    info = await js.stream_info(f"OBJ_{bucket}")
    assert info.state.bytes < 4 * MIB, f"the deleted object's chunks still take {info.state.bytes} bytes"
    with pytest.raises(ValueError):
        await stores[0].delete((tmp_path / "elsewhere" / "model.safetensors").as_uri())


def test_chunk_digests_are_each_chunks_blake3_and_catch_any_changed_byte(tmp_path: Path) -> None:
    source = random_file(tmp_path / "w.safetensors", 5 * MIB + 12345)
    data = source.read_bytes()
    whole, chunks = file_digests(source, MIB)
    assert whole == hashlib.sha256(data).hexdigest()
    assert chunks.chunk_bytes == MIB and len(chunks.digests) == 6
    assert list(chunks.digests) == [
        blake3.blake3(data[i : i + MIB]).digest() for i in range(0, len(data), MIB)
    ]
    verify_chunks(source, chunks)

    for at, chunk in ((0, 0), (3 * MIB + 1, 3), (len(data) - 1, 5)):
        changed = bytearray(data)
        changed[at] ^= 0x01
        source.write_bytes(bytes(changed))
        with pytest.raises(ChecksumError, match=f"chunk {chunk} has BLAKE3"):
            verify_chunks(source, chunks)
    for size in (5 * MIB, 6 * MIB + 1):  # one chunk fewer, one more
        source.write_bytes(data[:size] + os.urandom(max(0, size - len(data))))
        with pytest.raises(ChecksumError, match="has 6 chunk digests"):
            verify_chunks(source, chunks)
    source.write_bytes(data + b"x")  # same chunk count, one byte longer
    with pytest.raises(ChecksumError, match="chunk 5 has BLAKE3"):
        verify_chunks(source, chunks)

    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert chunk_digests(empty, MIB).digests == (blake3.blake3(b"").digest(),)


async def test_both_stores_put_the_chunk_digests_of_what_they_stored(js, run_id: str, tmp_path: Path) -> None:
    source = random_file(tmp_path / "w.safetensors", 3 * MIB + 5)
    for store in (FileWeightStore(tmp_path / "store"), NatsObjectWeightStore(js, f"w_{run_id}")):
        stored = await store.put(source, run_id=run_id, version=1)
        assert stored.chunks == chunk_digests(source), type(store).__name__


def test_chunk_sizes_cut_a_file_into_about_64_chunks_within_1_to_16_mib() -> None:
    assert chunk_size_for(0) == chunk_size_for(2_500_000) == MIB
    assert chunk_size_for(100 * 10**6) == 2 * MIB  # 48 chunks
    assert chunk_size_for(988_097_824) == 16 * MIB  # Qwen2.5-0.5B in bf16: 59 chunks
    assert chunk_size_for(140 * 10**9) == 16 * MIB  # 70B: 8,345 chunks, the largest size
