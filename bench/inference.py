"""Inference benchmark: the service against its engine, continuous batching, weight updates.

Everything is measured in the same run on the same machine, and reported as ratios against a
baseline measured alongside it (this machine is shared; absolute numbers mean little):

- `service_tokens_per_s` / `direct_tokens_per_s` = `service_ratio` (goal >= 0.9): 256 prompts
  through a real nats-server and an `offbeat-inference` process, against the same transformers
  engine called directly in this process with the same prompts and settings. Both are warmed up
  with a full batch first (the service process is fresh: its first calls of new shapes are slow).
  Five pairs of runs (three with --quick), each pair in the other order than the last, so that a
  drift of the shared machine cancels; `service_ratio` is the median of the pairs' ratios (a
  one-off stall of either side moves one pair, not the figure), `service_ratio_best` the best
  service run over the best direct run, and `direct_tokens_per_s` / `service_tokens_per_s` the
  medians.
- `cb_tokens_per_s` / `static_tokens_per_s` = `cb_speedup` (goal >= 1.5): the transformers
  engine's continuous batching against `model.generate` in static batches of the same size, on a
  long-tailed mix of completion lengths (most short, some long), sampling at temperature 1.
  `cb_speedup_same_engine` compares against the same engine admitting only into an empty batch,
  which isolates the scheduling gain from `generate`'s own per-step overhead.
- `weight_apply_s` / `safetensors_load_s` = `apply_ratio` (goal <= 2): the work of a weight
  update applied while 64 sequences are decoding (read the file and check names and shapes,
  concurrently with decoding; then copy into the parameters between two steps), against loading
  the same file with `safetensors.torch.load_file` into tensors in memory (`load_file` maps the
  file lazily, so the baseline includes one pass that reads every tensor; `safetensors_open_s` is
  the lazy call alone). `weight_live_s` adds the wait for the decode step that was running when
  the update came (the latency until the version is live).

    .venv/bin/python bench/inference.py [--quick]

The last stdout line is one JSON object with those figures. Not covered: vLLM (run the engine
tests in `.venv-vllm` for it), GPUs, models larger than a few hundred MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from offbeat_inference.engine import Sampling
from offbeat_inference.hf_engine import HFEngine

from offbeat.bus import Bus, Publication
from offbeat.config import BusConfig
from offbeat.infra import NatsServer, free_port
from offbeat.testing import wait_for
from offbeat.tinymodel import build_tiny_model
from offbeat.v1 import rollout_pb2

CAPACITY = 64


def prompts_and_budgets(n: int, *, seed: int, long_tail: bool) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = f"q{i}: " + "".join(rng.choice("abcdefghij +-*=0123456789") for _ in range(rng.randint(8, 48)))
        if long_tail:
            budget = rng.randint(128, 384) if rng.random() < 0.15 else rng.randint(8, 32)
        else:
            budget = 48
        out.append((text, budget))
    return out


async def run_direct(model: Path, work: list[tuple[str, int]], *, static: bool = False) -> tuple[int, float]:
    engine = HFEngine(str(model), capacity=CAPACITY, max_model_len=1024, static_batches=static)
    await engine.start()
    tok = engine.tokenizer
    prompts = [tok.encode(t) for t, _ in work]
    started = time.perf_counter()
    gens = await asyncio.gather(
        *(
            engine.generate(p, Sampling(temperature=1.0, max_tokens=b, seed=i))
            for i, (p, (_, b)) in enumerate(zip(prompts, work, strict=True))
        )
    )
    elapsed = time.perf_counter() - started
    await engine.close()
    return sum(len(g.token_ids) for g in gens), elapsed


def run_static(model_dir: Path, work: list[tuple[str, int]]) -> tuple[int, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    total = 0
    torch.manual_seed(0)
    started = time.perf_counter()
    for i in range(0, len(work), CAPACITY):
        batch = work[i : i + CAPACITY]
        enc = tok([t for t, _ in batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max(b for _, b in batch),
                pad_token_id=tok.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        for row, (_, budget) in zip(new, batch, strict=True):
            useful = row[:budget]
            total += useful.index(eos) + 1 if eos in useful else len(useful)
    return total, time.perf_counter() - started


async def run_service(model: Path, work: list[tuple[str, int]], tmp: Path) -> tuple[int, float]:
    nats = NatsServer.start(tmp / "infra")
    cfg = BusConfig(nats_url=nats.url, stream_max_bytes=256 * 1024**2)
    port = free_port()
    run_toml = tmp / "run.toml"
    run_toml.write_text(
        f'[run]\nid = "bench"\nstate_dir = "{tmp / "state"}"\n[bus]\nstream_max_bytes = {cfg.stream_max_bytes}\n'
        f'[model]\npath = "{model}"\nmax_model_len = 1024\n'
        f"[inference]\nmax_batch = {CAPACITY}\nhealth_port = {port}\n"
    )
    exe = Path(sys.executable).parent / "offbeat-inference"
    proc = subprocess.Popen(
        [str(exe), "--config", str(run_toml), "--nats-url", nats.url], stderr=subprocess.DEVNULL
    )
    bus = await Bus.connect(cfg, "bench", name="bench")
    await bus.ensure()
    received: list[rollout_pb2.RolloutCompletion] = []
    done = asyncio.Event()
    expected = 0

    async def on(c: rollout_pb2.RolloutCompletion) -> None:
        received.append(c)
        if len(received) >= expected:
            done.set()

    await bus.subscribe(bus.subjects.rollout_completion, rollout_pb2.RolloutCompletion, on)

    def req(i: int, text: str, budget: int, tag: str) -> Publication[rollout_pb2.RolloutRequest]:
        r = rollout_pb2.RolloutRequest(
            run_id="bench",
            request_id=f"{tag}{i}",
            group_id=f"{tag}{i}",
            n=1,
            text=text,
            trajectory_ids=[f"{tag}{i}-0"],
            sampling=rollout_pb2.SamplingParams(temperature=1.0, max_tokens=budget, seed=i),
            created_at=time.time(),
        )
        return Publication(bus.subjects.rollout_request, r, f"request:{tag}{i}:0")

    try:
        # warm-up, as the direct runs had in this process: a full batch, so the fresh process's
        # first calls of new shapes are not timed
        expected = min(CAPACITY, len(work))
        await bus.publish_many([req(i, t, b, "w") for i, (t, b) in enumerate(work[:expected])])
        await asyncio.wait_for(done.wait(), timeout=300)
        received.clear()
        done.clear()
        expected = len(work)
        started = time.perf_counter()
        await bus.publish_many([req(i, t, b, "b") for i, (t, b) in enumerate(work)])
        await asyncio.wait_for(done.wait(), timeout=600)
        elapsed = time.perf_counter() - started
        return sum(len(c.completion_token_ids) for c in received), elapsed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        await bus.close()
        nats.stop()


async def run_weights(tmp: Path, *, hidden: int, layers: int, repeats: int) -> dict[str, float]:
    from safetensors.torch import load_file

    base = build_tiny_model(tmp / "wbase", hidden_size=hidden, layers=layers, heads=8, kv_heads=4, seed=0)
    other = build_tiny_model(tmp / "wother", hidden_size=hidden, layers=layers, heads=8, kv_heads=4, seed=1)
    files = [other / "model.safetensors", base / "model.safetensors"]
    loads, opens = [], []
    for i in range(repeats):
        started = time.perf_counter()
        state = load_file(str(files[i % 2]))
        opened = time.perf_counter()
        resident = {name: t.clone() for name, t in state.items()}  # load_file maps lazily: read it
        loads.append(time.perf_counter() - started)
        opens.append(opened - started)
        del state, resident
    engine = HFEngine(str(base), capacity=CAPACITY, max_model_len=2048)
    await engine.start()
    tok = engine.tokenizer
    busy = [
        asyncio.create_task(
            engine.generate(tok.encode(f"busy {i}"), Sampling(temperature=1.0, max_tokens=100_000))
        )
        for i in range(CAPACITY)
    ]
    # every busy sequence admitted; one that sampled EOS meanwhile is done (a random model may)
    await wait_for(
        lambda: not engine._waiting and len(engine._rows) + sum(t.done() for t in busy) == CAPACITY,
        timeout_s=600,
        interval_s=0.01,
    )
    applies, lives = [], []
    for i in range(repeats):
        applied = await engine.update_weights(files[i % 2], i + 1)
        applies.append(applied.details["work_s"])
        lives.append(applied.apply_s)
    in_flight = len(engine._rows)
    await engine.close()
    await asyncio.gather(*busy)
    return {
        "safetensors_load_s": statistics.median(loads),
        "safetensors_open_s": statistics.median(opens),
        "weight_apply_s": statistics.median(applies),
        "weight_live_s": statistics.median(lives),
        "weight_bytes": float(files[0].stat().st_size),
        "sequences_in_flight_during_apply": float(in_flight),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and repeats (a smoke run)")
    args = parser.parse_args()
    n = 64 if args.quick else 256
    tmp = Path(tempfile.mkdtemp(prefix="offbeat-bench-inference-"))
    model = build_tiny_model(tmp / "model")
    results: dict[str, float] = {}

    rounds = 1 if args.quick else 2
    mixed = prompts_and_budgets(n, seed=1, long_tail=True)
    await run_direct(model, mixed[:CAPACITY])  # warm-up: first calls of new shapes are slow here
    static, static_engine, cb = [], [], []
    for _ in range(rounds):  # alternate, keep the best of each: the machine is shared
        static_tokens, static_s = run_static(model, mixed)
        se_tokens, se_s = await run_direct(model, mixed, static=True)
        cb_tokens, cb_s = await run_direct(model, mixed)
        static.append(static_tokens / static_s)
        static_engine.append(se_tokens / se_s)
        cb.append(cb_tokens / cb_s)
        print(
            f"generate in static batches: {static_tokens} tokens in {static_s:.2f}s; engine in static "
            f"batches: {se_tokens} in {se_s:.2f}s; continuous: {cb_tokens} in {cb_s:.2f}s"
        )
    results["static_tokens_per_s"] = max(static)
    results["cb_tokens_per_s"] = max(cb)
    results["cb_speedup"] = results["cb_tokens_per_s"] / results["static_tokens_per_s"]
    # the same engine admitting only into an empty batch: the gain of continuous batching alone,
    # without the difference between `generate`'s per-step overhead and the engine's
    results["static_engine_tokens_per_s"] = max(static_engine)
    results["cb_speedup_same_engine"] = results["cb_tokens_per_s"] / results["static_engine_tokens_per_s"]

    uniform = prompts_and_budgets(n, seed=2, long_tail=False)
    direct: list[float] = []
    service: list[float] = []
    for i in range(2 * rounds + 1):  # pairs, each in the other order than the last: drift cancels

        async def one_direct() -> None:
            d_tokens, d_s = await run_direct(model, uniform)
            direct.append(d_tokens / d_s)

        async def one_service() -> None:
            s_tokens, s_s = await run_service(model, uniform, Path(tempfile.mkdtemp(dir=tmp)))
            service.append(s_tokens / s_s)

        for one in (one_direct, one_service) if i % 2 == 0 else (one_service, one_direct):
            await one()
        print(f"pair {i}: direct {direct[-1]:.0f} tokens/s, service {service[-1]:.0f} tokens/s")
    results["direct_tokens_per_s"] = statistics.median(direct)
    results["service_tokens_per_s"] = statistics.median(service)
    results["service_ratio"] = statistics.median(s / d for s, d in zip(service, direct, strict=True))
    results["service_ratio_best"] = max(service) / max(direct)

    weights = await run_weights(
        tmp, hidden=512 if not args.quick else 256, layers=8, repeats=5 if not args.quick else 3
    )
    results.update(weights)
    results["apply_ratio"] = results["weight_apply_s"] / results["safetensors_load_s"]
    print(
        f"weights ({weights['weight_bytes'] / 1e6:.0f} MB): load_file + read {weights['safetensors_load_s']:.3f}s, "
        f"apply with {CAPACITY} in flight {weights['weight_apply_s']:.3f}s (live after {weights['weight_live_s']:.3f}s)"
    )
    results["torch_threads"] = float(torch.get_num_threads())
    results["cpus"] = float(os.cpu_count() or 0)
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    asyncio.run(main())
