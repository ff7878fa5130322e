"""Overload: ten times more rollout requests than inference can hold, on a live run.

`offbeat run` runs all five services; inference holds at most `max_requests_in_flight` requests
(its capacity). On top of what the orchestrator dispatches, the test publishes 10 x capacity
requests at once on `rollout.request`, as the orchestrator would (its own ids, a real prompt of the
run's environment). Then, sampling every half second:

- backpressure holds: inference never holds more than its capacity (the inference consumer's
  unacknowledged count), the rest waits in the JetStream stream, not in a service;
- memory stays bounded: each service's resident memory under the burst stays within a fixed
  margin of what it used before it;
- nothing is dropped: every burst trajectory is generated and judged, no dead letters, and the
  audit of the stopped run finds none lost and none trained twice.

The smoke variant (capacity 4) runs by default; the full one (capacity 16) under `make chaos`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from harness import LiveRun, audit, query, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FACTOR = 10
BURST_TOKENS = 256
"""Completion length of the burst's requests (the run's own are 4 tokens): long enough that the
queue lasts several seconds on a fast machine (64 drained 40 requests in 2.6 s on one)."""
RSS_MARGIN_MB = 300.0
"""Most a service's resident memory may grow under the burst over its level before it. A service
that buffered the backlog would grow with it; torch allocator noise and a step's activations fit."""


class Sampler:
    """Samples RSS per service and the consumers' queues every `every_s` in a thread."""

    def __init__(self, run: LiveRun, nats_url: str, *, every_s: float = 0.5) -> None:
        self.run = run
        self.nats_url = nats_url
        self.every_s = every_s
        self.rss: list[tuple[float, dict[str, float]]] = []
        self.queues: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        asyncio.run(self._sample())

    async def _sample(self) -> None:
        import nats

        from offbeat.bus import Subjects

        nc = await nats.connect(self.nats_url, connect_timeout=5)
        js = nc.jetstream(timeout=5)
        stream = Subjects("offbeat", self.run.run_id).stream
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self.rss.append((now, self.run.rss_mb()))
                queues = {}
                for consumer in ("inference", "scorer", "trainer", "ledger"):
                    try:
                        info = await js.consumer_info(stream, consumer)
                    except Exception:
                        continue
                    queues[consumer] = (int(info.num_pending or 0), int(info.num_ack_pending or 0))
                self.queues.append((now, queues))
                await asyncio.sleep(self.every_s)
        finally:
            await nc.close()

    def peak_rss(self, since: float, until: float = float("inf")) -> dict[str, float]:
        peak: dict[str, float] = {}
        for at, sample in self.rss:
            if since <= at <= until:
                for name, mb in sample.items():
                    peak[name] = max(peak.get(name, 0.0), mb)
        return peak

    def peak_queue(self, consumer: str, index: int, since: float) -> int:
        return max((q[consumer][index] for at, q in self.queues if at >= since and consumer in q), default=0)


async def publish_burst(nats_url: str, run_id: str, count: int, group_size: int) -> tuple[list[str], int]:
    """`count` rollout requests for the run's environment, as the orchestrator sends them; returns
    their trajectory ids and the requests waiting in the stream for inference right after."""
    from offbeat_orchestrator.prompts import set_prompt

    from offbeat.bus import Bus, Publication
    from offbeat.config import BusConfig
    from offbeat.envs import load
    from offbeat.v1 import rollout_pb2

    env = load("sandbox_echo", size=50)
    examples = list(env.examples("train", seed=7))
    bus = await Bus.connect(BusConfig(nats_url=nats_url), run_id, name="overload")
    requests = []
    for i in range(count):
        example = examples[i % len(examples)]
        rid = f"ovl-{i:05d}"
        request = rollout_pb2.RolloutRequest(
            run_id=run_id,
            request_id=rid,
            group_id=rid,
            env="sandbox_echo",
            prompt_key=example.key,
            n=group_size,
            sampling=rollout_pb2.SamplingParams(temperature=1.0, max_tokens=BURST_TOKENS, seed=i),
            trajectory_ids=[f"{rid}-{j}" for j in range(group_size)],
            created_at=time.time(),
        )
        set_prompt(request, example.prompt)
        requests.append(request)
    try:
        await bus.publish_many(
            Publication(bus.subjects.rollout_request, r, f"request:{r.request_id}:0") for r in requests
        )
        waiting, _held = await bus.consumer_pending("inference")
    finally:
        await bus.close()
    return [tid for r in requests for tid in r.trajectory_ids], waiting


def overload(
    tmp_path: Path, nats_url: str, database_url: str, run_id: str, envpkg: Path, capacity: int
) -> None:
    config = write_config(
        tmp_path, run_id, max_steps=10_000, envs='name = "sandbox_echo"\nargs = { size = 50 }'
    )
    sets = (
        f"inference.max_requests_in_flight={capacity}",
        f"inference.max_batch={capacity * 4}",
        "launcher.final_eval_timeout_s=0",
    )
    started = time.monotonic()
    run = LiveRun(
        config, run_id=run_id, nats_url=nats_url, database_url=database_url, pythonpath=envpkg, sets=sets
    )
    try:
        with Sampler(run, nats_url) as sampler:
            run.wait(lambda: run.step() >= 3, timeout_s=300, what="step 3")
            before = time.monotonic()
            time.sleep(5.0)  # the level before the burst, with the pipeline warm
            burst_at = time.monotonic()
            ids, waiting = asyncio.run(publish_burst(nats_url, run_id, FACTOR * capacity, group_size=4))

            def judged() -> int:
                rows = query(
                    database_url,
                    "SELECT count(*) FROM trajectories WHERE run_id=%s AND trajectory_id LIKE 'ovl-%%' "
                    "AND status NOT IN ('requested', 'generated')",
                    run_id,
                )
                return int(rows[0][0]) == len(ids)

            run.wait(judged, timeout_s=900, what=f"all {len(ids)} burst trajectories judged")
            drained_at = time.monotonic()
            time.sleep(2.0)
        pids_before_stop = run.pids()
    finally:
        run.stop()
    wall_s = time.monotonic() - started
    assert len(pids_before_stop) == 5 and not run.restarts(), f"services died under load: {run.restarts()}"
    result = audit(run)
    base = sampler.peak_rss(before, burst_at)
    peak = sampler.peak_rss(burst_at, drained_at)
    held = sampler.peak_queue("inference", 1, before)
    waiting = max(waiting, sampler.peak_queue("inference", 0, burst_at))
    burst_rows = query(
        database_url,
        "SELECT status, count(*) FROM trajectories WHERE run_id=%s AND trajectory_id LIKE 'ovl-%%' GROUP BY 1",
        run_id,
    )
    counts = result.counts() | {
        "capacity_requests": capacity,
        "burst_requests": FACTOR * capacity,
        "burst_trajectories": len(ids),
        "burst_fates": dict(burst_rows),
        "inference_held_max": held,
        "inference_waiting_max": waiting,
        "rss_before_mb": {k: round(v) for k, v in sorted(base.items())},
        "rss_peak_mb": {k: round(v) for k, v in sorted(peak.items())},
        "burst_drain_s": round(drained_at - burst_at, 1),
        "wall_s": round(wall_s, 1),
    }
    print("overload counts:", json.dumps(counts, indent=2))
    assert result.dead_letters == {}, f"dead letters under load: {result.dead_letters}"
    assert not result.unrequested, result.details.get("unrequested")
    result.check_balanced()
    assert held <= capacity, f"inference held {held} requests with a capacity of {capacity}"
    assert waiting >= capacity, f"the burst did not queue: at most {waiting} requests waited for inference"
    for name, mb in peak.items():
        assert mb <= base.get(name, mb) + RSS_MARGIN_MB, f"{name} grew from {base.get(name)} to {mb} MiB"


def test_ten_times_capacity_is_queued_not_dropped_smoke(tmp_path, nats_url, database_url, run_id, envpkg):
    overload(tmp_path, nats_url, database_url, run_id, envpkg, capacity=4)


@pytest.mark.chaos
def test_ten_times_capacity_is_queued_not_dropped(tmp_path, nats_url, database_url, run_id, envpkg):
    overload(tmp_path, nats_url, database_url, run_id, envpkg, capacity=16)
