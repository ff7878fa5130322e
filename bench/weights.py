"""Weight publication: from the trainer announcing a version to inference serving it.

For each model (the tiny test model, and `qwen05b`: a Qwen2 model shaped like Qwen/Qwen2.5-0.5B,
494M parameters in bfloat16, random weights built once into the temp dir since no hub is
reachable) and each weight store (`file`: `FileWeightStore`, `nats`: `NatsObjectWeightStore`):

1. trainer side, not timed in the ratio: the trainer's own `save_weights` writes the state dict,
   the store from `offbeat_trainer.publish.resolve_store` puts it (`<m>_<store>_put_s`), and
   `weight_version` builds the announcement;
2. timed (`<m>_<store>_live_s`): publish the announcement on `policy.weights` (and the KV head)
   through a real nats-server to a real inference service (`offbeat-inference`, its own process
   with the transformers engine, as deployed); it fetches the version (the `nats` store: received
   into a file, its chunks hashed as they arrive), reads it into staging tensors (the `file`
   store: each 1-16 MiB chunk's BLAKE3 digest computed on the hash pool, one thread a core, as
   soon as it has been read) and swaps them in once every digest matched; the time ends when the
   replica's `PolicyLive` for that version arrives back on the bus (`<m>_<store>_live_MBps`: the
   file's bytes over that time);
3. baseline (`<m>_<store>_safetensors_s`): a plain `safetensors.torch.load_file` of the same
   file, plus one pass that reads every tensor (`load_file` maps lazily), alternated with 2;
4. for scale (`<m>_<store>_sha256_s`): one `hashlib.sha256` pass over the same file, what
   verifying it by its sha256 alone would cost on one core;
5. the `nats` store's floor (`<m>_nats_receive_only_s`, and `<m>_nats_receive_floor_ratio` over
   the baseline): the store's own receive loop alone, every chunk of the object through nats-py on
   a fresh connection in this process, nothing written or hashed. No `nats` update can go live
   faster than its object arrives, so where this ratio is over 2 the goal is out of reach with
   this client, whatever the rest of the update costs;
6. the CPU under that floor (`<m>_nats_receive_client_cpu_s`, `<m>_nats_receive_server_cpu_s`):
   the CPU seconds this process and the nats-server process spent on that fetch (the server reads
   its stream's blocks, frames them and writes the socket). Spread over every core of the machine,
   their sum is the least wall time any fetch through this server and client can take here:
   `<m>_nats_cpu_floor_ratio` = (client + server CPU) / cores / baseline.

`<m>_<store>_ratio` = median live / median baseline; goal <= 2. `<m>_<store>_over_sha256` = median
live / median sha256. Every byte is hashed before a version goes live, and a load from the page
cache runs at memcpy speed, faster than even BLAKE3 on one core: the `file` store's floor is the
BLAKE3 pass divided among the cores (the chunk digests), plus the read, so its ratio falls with
the number of cores (2 here). The `nats` store is bound by the rate at which the client receives
the object's chunks (its hash overlaps that).

The engine is idle during the update (an update while 64 sequences decode is
`bench/inference.py`'s `apply_ratio`). Medians of 7 versions per store and model; the first two
updates of a replica fault in fresh memory for its two copies of the weights (later ones reuse
them), and they are in the sample (printed per version). The trainer's side (store, announcement,
head) and the baselines run in this process, the service in its own, as in a deployment. The
machine is shared, so only same-run ratios mean much.

    .venv/bin/python bench/weights.py [--quick]    # --quick: the tiny model only

The last stdout line is one JSON object with those figures. Not covered: vLLM's update path,
GPUs, NCCL broadcast, stores on a network filesystem (the `file` store reads a local disk here).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from offbeat_trainer.checkpoint import save_weights
from offbeat_trainer.publish import resolve_store, version_record, weight_version
from safetensors.torch import load_file

from offbeat.bus import Bus
from offbeat.config import BusConfig
from offbeat.infra import NatsServer
from offbeat.tinymodel import build_tiny_model, build_tokenizer
from offbeat.v1 import policy_pb2
from offbeat.weights import NatsObjectWeightStore, sha256_file

RUN = "bench-weights"
REPLICA = "bench"
# Qwen/Qwen2.5-0.5B's config.json, less what a random model does not need
QWEN05B: dict[str, Any] = {
    "vocab_size": 151_936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32_768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


def build_qwen05b(path: Path) -> Path:
    """The 0.5B model with random weights in bfloat16 (cached: built once per temp dir)."""
    done = path / "built.json"
    if done.exists() and json.loads(done.read_text()) == QWEN05B:
        return path
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shutil.rmtree(path, ignore_errors=True)
    build_tokenizer(path)
    config = Qwen2Config(**QWEN05B, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(str(path), safe_serialization=True)
    del model
    done.write_text(json.dumps(QWEN05B))
    return path


def plain_sha256(path: Path) -> float:
    started = time.perf_counter()
    sha256_file(path)
    return time.perf_counter() - started


def plain_load(path: Path) -> float:
    """`load_file` and one read of every tensor: what loading the file costs without offbeat."""
    started = time.perf_counter()
    state = load_file(str(path))
    resident = {name: t.clone() for name, t in state.items()}
    elapsed = time.perf_counter() - started
    del state, resident
    return elapsed


async def nats_receive(url: str, uri: str, server_pid: int) -> tuple[float, float, float]:
    """The `nats` store's fetch of `uri` receiving every chunk on a fresh connection in this
    process, with nothing written or hashed: its seconds (that store's floor with this client),
    and the CPU seconds this process and the nats-server spent on it."""
    import nats as nats_client

    bucket, _, name = uri.removeprefix("nats://").partition("/")
    server = psutil.Process(server_pid)
    nc = await nats_client.connect(url)
    try:
        store = NatsObjectWeightStore(nc.jetstream(), bucket)
        info = await (await store._obs()).get_info(name)
        server_before, client_before = server.cpu_times(), time.process_time()
        started = time.perf_counter()
        await store._receive(info, Path(os.devnull), lambda _: None)
        elapsed = time.perf_counter() - started
        client_cpu = time.process_time() - client_before
        server_after = server.cpu_times()
        server_cpu = server_after.user + server_after.system - server_before.user - server_before.system
        return elapsed, client_cpu, server_cpu
    finally:
        await nc.close()


def trainer_weights(model_dir: Path, version: int, out: Path) -> Path:
    """What the trainer writes for `version`: its state dict through its own `save_weights`.

    The state is the base model (mapped, not read) with a different final norm per version, so
    every version's file and sha256 are new; nothing of it stays in memory afterwards.
    """
    state = load_file(str(model_dir / "model.safetensors"))
    norm = "model.norm.weight"
    state[norm] = torch.full_like(state[norm], 1.0 + version / 100)
    path = save_weights(state, out)
    del state
    gc.collect()
    return path


async def start_replica(
    cfg: BusConfig, run: str, model_dir: Path, *, dtype: str, state_dir: Path, log: Path
) -> asyncio.subprocess.Process:
    """`offbeat-inference` serving `model_dir` in `run`, in a process of its own."""
    sets = {
        "run.id": run,
        "run.state_dir": str(state_dir),
        "bus.stream_max_bytes": cfg.stream_max_bytes,
        "model.path": str(model_dir),
        "model.dtype": dtype,
        "model.max_model_len": 1024,
        "inference.max_batch": 4,
        "inference.replica": REPLICA,
        "inference.log_level": "WARNING",
    }
    args = [sys.executable, "-m", "offbeat_inference", "--nats-url", cfg.nats_url]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(*args, stdout=out, stderr=subprocess.STDOUT)


async def stop_replica(replica: asyncio.subprocess.Process) -> None:
    if replica.returncode is None:
        replica.terminate()
        try:
            await asyncio.wait_for(replica.wait(), timeout=30)
        except TimeoutError:
            replica.kill()
            await replica.wait()


async def bench_model(
    name: str,
    model_dir: Path,
    *,
    dtype: str,
    stores: list[str],
    repeats: int,
    cfg: BusConfig,
    server_pid: int,
    tmp: Path,
) -> dict[str, float]:
    run = f"{RUN}-{name}"  # a run per model: its own subjects and KV head
    trainer_bus = await Bus.connect(cfg, run, name=f"bench-trainer-{name}")
    await trainer_bus.ensure()
    version = 0
    lives: dict[int, asyncio.Future[policy_pb2.PolicyLive]] = {
        version: asyncio.get_running_loop().create_future()
    }

    async def on_live(live: policy_pb2.PolicyLive) -> None:
        future = lives.get(live.version)
        if live.replica == REPLICA and future is not None and not future.done():
            future.set_result(live)

    await trainer_bus.subscribe(trainer_bus.subjects.policy_live, policy_pb2.PolicyLive, on_live)
    log = tmp / f"{name}-inference.log"
    replica = await start_replica(cfg, run, model_dir, dtype=dtype, state_dir=tmp / f"{name}-state", log=log)
    results: dict[str, float] = {}
    try:
        started = time.perf_counter()
        ready = asyncio.ensure_future(lives[version])
        exited = asyncio.ensure_future(replica.wait())
        await asyncio.wait({ready, exited}, timeout=600, return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if not ready.done():
            raise RuntimeError(f"offbeat-inference did not come up ({log}):\n{log.read_text()[-2000:]}")
        print(f"{name}: offbeat-inference serving version 0 after {time.perf_counter() - started:.1f}s")
        for store_name in stores:
            uri = (tmp / f"{name}-store").as_uri() if store_name == "file" else f"nats://w_{name}"
            store = resolve_store(uri, str(tmp), js=trainer_bus.js)
            puts, live_s, applies, loads, hashes = [], [], [], [], []
            receives, receive_cpu, server_cpus = [], [], []
            for i in range(repeats):
                version += 1
                local = await asyncio.to_thread(
                    trainer_weights, model_dir, version, tmp / f".{name}-weights.safetensors"
                )
                started = time.perf_counter()
                stored = await store.put(local, run_id=run, version=version)
                puts.append(time.perf_counter() - started)
                record = version_record(stored, step=version, parent=version - 1)
                wv = weight_version(run, version, record)
                future = lives[version] = asyncio.get_running_loop().create_future()
                if i % 2:
                    loads.append(await asyncio.to_thread(plain_load, local))
                started = time.perf_counter()
                await trainer_bus.publish(
                    trainer_bus.subjects.policy_weights, wv, msg_id=f"weights:{version}"
                )
                await trainer_bus.put_head(wv)
                live = await asyncio.wait_for(future, timeout=600)
                live_s.append(time.perf_counter() - started)
                if not live.ok:
                    raise RuntimeError(f"{name} via {store_name}: version {version} refused: {live.error}")
                applies.append(live.apply_s)
                if not i % 2:
                    loads.append(await asyncio.to_thread(plain_load, local))
                hashes.append(await asyncio.to_thread(plain_sha256, local))
                if store_name == "nats":
                    receive, client_cpu, server_cpu = await nats_receive(cfg.nats_url, stored.uri, server_pid)
                    receives.append(receive)
                    receive_cpu.append(client_cpu)
                    server_cpus.append(server_cpu)
                print(
                    f"{name} {store_name} v{version}: put {puts[-1]:.3f}s, announce->live "
                    f"{live_s[-1]:.3f}s (engine apply {live.apply_s:.3f}s), safetensors {loads[-1]:.3f}s",
                    flush=True,
                )
                if store_name == "file":
                    Path(stored.uri.removeprefix("file://")).unlink()
                else:
                    bucket, _, obj = stored.uri.removeprefix("nats://").partition("/")
                    await (await trainer_bus.js.object_store(bucket)).delete(obj)
            local.unlink()
            key = f"{name}_{store_name}"
            results[f"{key}_put_s"] = statistics.median(puts)
            results[f"{key}_live_s"] = statistics.median(live_s)
            results[f"{key}_engine_apply_s"] = statistics.median(applies)
            results[f"{key}_safetensors_s"] = statistics.median(loads)
            results[f"{key}_sha256_s"] = statistics.median(hashes)
            results[f"{key}_ratio"] = results[f"{key}_live_s"] / results[f"{key}_safetensors_s"]
            results[f"{key}_live_MBps"] = stored.size_bytes / results[f"{key}_live_s"] / 1e6
            results[f"{key}_over_sha256"] = results[f"{key}_live_s"] / results[f"{key}_sha256_s"]
            if receives:
                results[f"{key}_receive_only_s"] = statistics.median(receives)
                results[f"{key}_receive_floor_ratio"] = (
                    results[f"{key}_receive_only_s"] / results[f"{key}_safetensors_s"]
                )
                results[f"{key}_receive_client_cpu_s"] = statistics.median(receive_cpu)
                results[f"{key}_receive_server_cpu_s"] = statistics.median(server_cpus)
                results[f"{key}_cpu_floor_ratio"] = (
                    (results[f"{key}_receive_client_cpu_s"] + results[f"{key}_receive_server_cpu_s"])
                    / len(os.sched_getaffinity(0))
                    / results[f"{key}_safetensors_s"]
                )
        results[f"{name}_bytes"] = float(stored.size_bytes)
    finally:
        await stop_replica(replica)
        await trainer_bus.close()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--stores", default="file,nats", help="comma-separated: file, nats")
    parser.add_argument("--models", default="tiny,qwen05b", help="comma-separated: tiny, qwen05b")
    args = parser.parse_args()
    stores = args.stores.split(",")
    models = ["tiny"] if args.quick else args.models.split(",")
    if unknown := set(models) - {"tiny", "qwen05b"}:
        parser.error(f"--models: unknown {sorted(unknown)} (tiny, qwen05b)")
    tmp = Path(tempfile.mkdtemp(prefix="offbeat-bench-weights-"))
    nats = NatsServer.start(tmp / "infra")
    cfg = BusConfig(nats_url=nats.url, stream_max_bytes=256 * 1024**2)
    results: dict[str, float] = {}
    try:
        for name in models:
            if name == "tiny":
                model_dir, dtype = build_tiny_model(tmp / "tiny"), "float32"
            else:
                model_dir, dtype = (
                    build_qwen05b(Path(tempfile.gettempdir()) / "offbeat-bench-qwen05b"),
                    "bfloat16",
                )
            results.update(
                await bench_model(
                    name,
                    model_dir,
                    dtype=dtype,
                    stores=stores,
                    repeats=7,
                    cfg=cfg,
                    server_pid=nats.pid,
                    tmp=tmp,
                )
            )
    finally:
        nats.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    results["torch_threads"] = float(torch.get_num_threads())
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    asyncio.run(main())
