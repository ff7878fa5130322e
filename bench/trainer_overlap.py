"""The trainer service's time per step with the commit overlapped (`[trainer] overlap_commit`) and not.

A real `offbeat-trainer` process on a real nats-server trains `STEPS` steps of the demo's shape
(1,024 trajectories a step: 256 groups of 4; the arithmetic example's tiny model, hidden 128,
4 layers) from a backlog published before it starts, so it never waits for data: its time per
step is the training plus whatever of the commit stays on the step's path (the snapshot, the
weights file, the store, the checkpoint and its fsyncs, the announcement, the report and 1,024
confirmed acks). With `overlap_commit` the commit of step N runs while step N+1 trains; without,
each step waits for its own.

Rounds alternate on and off (a fresh stream, state directory and process each), `ROUNDS` of each;
a round's time per step is from its first step's log line to its last over the steps between (the
first step, which warms up, is left out). Medians. The machine is shared: only the same-run ratio
means much, and here both the training and the commit run on the same 2 cores.

    .venv/bin/python bench/trainer_overlap.py [steps]

Last line: {"overlap_step_s", "inline_step_s", "speedup"} (speedup = inline / overlap), and per
mode the median time per step outside the training itself (`*_outside_training_s`: the step
report's `step_s` taken from the step's time).
Not covered: a GPU step, where the commit's CPU and disk work would not compete with training.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from offbeat.bus import Bus, Publication
from offbeat.config import BusConfig
from offbeat.infra import NatsServer
from offbeat.tinymodel import build_tiny_model
from offbeat.v1 import rollout_pb2

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
ROUNDS = 3
GROUPS, GROUP_SIZE = 256, 4
PROMPT_LEN, COMPLETION_LEN = 20, 5
BIN = Path(sys.executable).parent


def backlog(run_id: str) -> list[rollout_pb2.ScoredTrajectory]:
    """`STEPS` steps of scored groups; a third of the groups all right (advantage 0, as in the
    demo, where such samples skip the model), the rest half right."""
    out = []
    for g in range(STEPS * GROUPS):
        prompt = [(g * 7 + 3 * i) % 250 + 5 for i in range(PROMPT_LEN)]
        for i in range(GROUP_SIZE):
            tid = f"g{g}-{i}"
            completion = [(g * 13 + 11 * i + 5 * j) % 250 + 5 for j in range(COMPLETION_LEN)]
            out.append(
                rollout_pb2.ScoredTrajectory(
                    completion=rollout_pb2.RolloutCompletion(
                        run_id=run_id,
                        trajectory_id=tid,
                        request_id=f"r-g{g}",
                        group_id=f"g{g}",
                        env="bench",
                        prompt_key=f"g{g}",
                        group_size=GROUP_SIZE,
                        prompt_token_ids=prompt,
                        completion_token_ids=completion,
                        logprobs=[-5.5] * COMPLETION_LEN,
                        finish_reason="stop",
                        version_spans=[rollout_pb2.VersionSpan(version=0, start=0, end=COMPLETION_LEN)],
                    ),
                    reward=1.0 if g % 3 == 0 else float(i % 2),
                    status=rollout_pb2.REWARD_STATUS_OK,
                )
            )
    return out


async def publish_backlog(cfg: BusConfig, run_id: str) -> None:
    bus = await Bus.connect(cfg, run_id, name="bench")
    try:
        await bus.ensure()
        await bus.publish_many(
            Publication(bus.subjects.rollout_scored, m, f"scored:{m.completion.trajectory_id}")
            for m in backlog(run_id)
        )
    finally:
        await bus.close()


async def train_times_and_drop(cfg: BusConfig, run_id: str) -> list[float]:
    """`step_s` (the training alone) of every step report in the run's stream; then the streams
    are deleted."""
    from offbeat.v1 import policy_pb2

    bus = await Bus.connect(cfg, run_id, name="bench")
    try:
        sub = await bus.js.pull_subscribe(bus.subjects.trainer_step, durable=None)
        reports = []
        while len(reports) < STEPS:
            reports += [policy_pb2.TrainerStep.FromString(m.data) for m in await sub.fetch(STEPS, timeout=5)]
        await sub.unsubscribe()
        await bus.delete_streams()
    finally:
        await bus.close()
    return [r.metrics["step_s"] for r in sorted(reports, key=lambda r: r.step)]


def one_round(tmp: Path, cfg: BusConfig, model: Path, overlap: bool, k: int) -> tuple[float, float]:
    """(time per step, median time training alone) of one round."""
    run_id = f"bench-overlap-{k}-{'on' if overlap else 'off'}"
    asyncio.run(publish_backlog(cfg, run_id))
    config = tmp / f"{run_id}.toml"
    config.write_text(
        f'[run]\nid = "{run_id}"\nstate_dir = "{tmp / run_id}"\ngroup_size = {GROUP_SIZE}\n'
        f"groups_per_step = {GROUPS}\nmax_steps = {STEPS}\nmax_staleness = 1000\n"
        f'[model]\npath = "{model}"\n[bus]\nstream_max_bytes = {cfg.stream_max_bytes}\n'
        f"[trainer]\noverlap_commit = {str(overlap).lower()}\ntorch_threads = 1\n"
    )
    log = tmp / f"{run_id}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "offbeat-trainer"), "--config", str(config), "--nats-url", cfg.nats_url],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 600
        while "trainer finished" not in log.read_text() and proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"round {run_id} did not finish: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        proc.terminate()
        proc.wait(timeout=60)
    train_s = statistics.median(asyncio.run(train_times_and_drop(cfg, run_id))[1:])
    stamps = [json.loads(line)["ts"] for line in log.read_text().splitlines() if '"msg": "step"' in line]
    if len(stamps) != STEPS:
        raise SystemExit(f"round {run_id}: {len(stamps)} steps logged, expected {STEPS}")
    per_step = (stamps[-1] - stamps[0]) / (STEPS - 1)
    print(
        f"round {k} overlap={'on ' if overlap else 'off'}: {per_step:.3f} s/step, training {train_s:.3f} s",
        flush=True,
    )
    return per_step, train_s


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="offbeat-bench-overlap-") as d:
        tmp = Path(d)
        model = build_tiny_model(tmp / "model", hidden_size=128, layers=4, heads=4, kv_heads=2)
        nats = NatsServer.start(tmp / "infra")
        cfg = BusConfig(nats_url=nats.url, stream_max_bytes=256 * 1024**2)
        times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        try:
            for k in range(ROUNDS):
                for overlap in (True, False) if k % 2 == 0 else (False, True):
                    times[overlap].append(one_round(tmp, cfg, model, overlap, k))
        finally:
            nats.stop()
    on, off = (statistics.median(t for t, _ in times[o]) for o in (True, False))
    # what of the commit stays on a step's path: its time less the training's
    on_path = {o: statistics.median(t - train for t, train in times[o]) for o in (True, False)}
    print(
        json.dumps(
            {
                "overlap_step_s": round(on, 4),
                "inline_step_s": round(off, 4),
                "speedup": round(off / on, 3),
                "overlap_outside_training_s": round(on_path[True], 4),
                "inline_outside_training_s": round(on_path[False], 4),
                "steps": STEPS,
                "rounds": ROUNDS,
            }
        )
    )


if __name__ == "__main__":
    main()
