"""Asynchronous speedup: the same `offbeat run` with `max_staleness` 0 (synchronous), 1, 2 and 4.

The run: the tiny Qwen2 model (untrained, same initialisation), seed 0, 8 groups of 8 samples per
step, `STEPS` steps, through `offbeat run` with all five services on one nats-server and
PostgreSQL started here. The workload has long-tailed completion lengths: sampling stops at EOS
or at any of eight stop characters, which the untrained model emits with probability ~1/30 per
token, so lengths are geometric (mean ~30 tokens, the longest of a step's 64 ~4-5x that, cap 200):
a synchronous step waits for its longest completion. The environment is `bench_digits`, defined
below and registered for the run through an entry point on PYTHONPATH: the reward is the fraction
of the completion's characters that are digits, which the model starts at ~0.04 and learns from
the first step without a warm start (an SFT warm start would cost minutes on this machine), and
which does not reward length. Eval: 32 prompts x 4 samples at temperature 1 at step 0 and at the
last step (the mean reward of the policy, not a greedy 0/1).

Threads: the machine has 2 cores shared by every service (and the servers). Inference and the
trainer get one torch thread each (`torch_threads = 1`), so generation and training can run at
the same time, one core each, as they would on their own accelerators; with torch's default
(both use both cores) the two phases would only take turns on the same cores and overlapping them
could not gain anything.

Per setting (from the ledger): `wall_s`, from inference serving the base model (version 0 live;
the services' start-up is left out) to the last step's report;
trainer idle fraction (not between a batch being formed and its step being committed); inference
idle fraction (no requested trajectory left to generate: 1 - |union of [requested, generated]| /
wall); mean staleness of the trained trajectories; final eval reward (the last version's) with its
standard error. `ideal_speedup` comes from the synchronous run: its steps split into training (the
trainer busy, T_train) and everything else (generation, scoring, dispatch and weight updates,
T_gen = wall - T_train); a synchronous step costs T_gen + T_train, an ideal asynchronous one the
larger of the two, so `ideal_speedup = (T_gen + T_train) / max(T_gen, T_train)`.

"Within noise" for the eval reward: |eval_k - eval_0| <= noise, noise = the largest of twice the
combined standard error of the two evals, the spread between two synchronous runs on seeds 0
and 1 (a second synchronous run, for that), and the spread between the two k = 2 runs
(`eval_async_spread`: the same configuration and seed, but an asynchronous run's batches depend
on which groups finish first, so two of them differ; measured 0.036 once, where the synchronous
seed spread was 0.004); `eval_gap_vs_noise` is the largest |gap| / noise.

Runs (`PLAN`): k0 and k2 twice, back to back in both orders (k0, k2, ..., k2, k0), so a change in
the machine's load weighs on both sides of the goal's ratio; `k2_vs_ideal` is the mean of the two
rounds' (speedup / ideal), also given per round. The synchronous runs are deterministic (the same
samples, eval and lengths each time), so two of them differ only by the machine.

Goals: `k2_vs_ideal` = speedup at max_staleness 2 / ideal_speedup >= 0.85; `eval_gap_vs_noise` <= 1.

What idles (ledger timelines of these runs): with k >= 1 the trainer waits only for its first
batch (the pipeline fill: the first groups share the engine with the step-0 eval and the other
k steps' groups) and ~0.1 s per step of commit tail (checkpoint, announcements, acks); it never
waits for a batch afterwards, so an asynchronous run is training-bound and its wall is about
T_train plus the fill. Inference then idles by design: a step's G groups are generated faster
than the step trains, and the budget releases G groups per step. Asynchronous generation is also
cheaper per step than the synchronous phase (the stragglers of one step decode alongside the next
step's requests), so when T_gen > T_train a run can beat `ideal_speedup`. What makes it miss is
CPU: on 2 cores shared with other work, overlapping the phases slows each of them (the same
deterministic synchronous run took 77 s and 116 s on this machine at a load average of 5-7).
`load_avg` (1-minute, after each run) is in the output for that reason; the figures mean most
below ~3.

Measured here (24 steps, load average 1.6-2.4, after the trainer stopped holding groups whose
member was dropped on arrival, which had stalled 2 of 8 asynchronous runs for the scheduler's 30 s
stall guard): ideal 1.85, speedup at k = 1, 2, 4: 1.60, 2.09, 2.39; k2_vs_ideal per round 0.79
and 1.51 (mean 1.15); trainer idle 0.54 (k0) vs 0.25-0.28 (k >= 1); staleness 0.85, 1.69, 3.58;
final eval 0.4435 (k0), 0.433, 0.442, 0.510: k = 1 and 2 are within noise, k = 4 ends above the
synchronous run (0.49-0.51 in every k = 4 run seen, gap/noise 1.3-2.0).

Selection by finishing order is small: among the samples of versions 0-2 (the same policy in
every setting), generated and trained lengths have the same median (16-18 tokens) at every k, and
the samples dropped stale (40-210 of ~1,700) are longer (median 29-35 against 22-25 trained).
The trained completions of asynchronous runs are shorter over the whole run (median 22-25
against 28-29) because their policies differ, not because of which samples were kept.

What k = 4's lead comes from is the importance ratio, measured by changing only the trainer's
loss in k = 4 runs (seeds 0 and 1; synchronous: 0.440 and 0.439): the default IcePop masks
(ratio kept in [0.125, 8], prime-rl's defaults) end at 0.48-0.51 and 0.468; plain policy gradient
without the ratio ends at 0.378 and 0.362, below the synchronous run, so four steps of staleness
uncorrected cost reward and the correction more than makes it up; masks of [0.5, 2] end at 0.443
and 0.394 (and k = 2 at 0.436). On stale samples the ratio weights the tokens the policy has since
moved towards by up to 8x, and on this reward, which every token moves, that acts as a larger
step. The default stays the field's; `[trainer] mask_low` / `mask_high` narrow it.

Not covered: GPUs (the same bench runs there, but the figures here are for 2 shared CPU cores),
more than one inference replica.

Usage: `python bench/async_speedup.py [STEPS]`; last line one JSON object.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from offbeat.envs import Environment, Example, Reward, RewardStatus

HERE = Path(__file__).resolve().parent
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 and __name__ == "__main__" else 24
SETTINGS = (0, 1, 2, 4)
STOP = ["!", "#", "$", "%", "&", "*", "+", "="]
EARLY_VERSIONS = 2
"""Samples begun under versions 0..EARLY_VERSIONS: the same policy in every setting."""


class Digits(Environment):
    """Write digits: the reward is the fraction of the completion's characters that are digits."""

    def __init__(self, *, size: int = 1000) -> None:
        self.size = size

    def examples(self, split: Any = "train", seed: int = 0) -> Iterator[Example]:
        keys = [f"{split}:{i}" for i in range(self.size)]
        random.Random(seed).shuffle(keys)
        return (self.get(k) for k in keys)

    def get(self, key: str) -> Example:
        split, _, i = key.partition(":")
        if split not in ("train", "eval") or not i.isdigit():
            raise KeyError(key)
        return Example(key=key, prompt=f"Digits, {split} {i}:")

    async def score(self, example: Example, completion: str) -> Reward:
        share = sum(c.isdigit() for c in completion) / len(completion) if completion else 0.0
        return Reward(share, {"digits": share}, RewardStatus.OK)


CONFIG = """
[run]
id = "async-k0"
seed = 0
state_dir = "{state}"
max_staleness = 0
group_size = 8
groups_per_step = 8
max_steps = {steps}

# seven runs share one nats-server, and a run's stream reserves its limit on disk
[bus]
stream_max_bytes = 268435456

[model]
max_model_len = 256

[[envs]]
name = "bench_digits"

[launcher]
tiny_model = {{ hidden_size = 128, layers = 4, heads = 4, kv_heads = 2 }}
progress_interval_s = 5.0
final_eval_timeout_s = 180

[orchestrator]
admin_port = 0
eval_every = {steps}
eval_examples = 32
eval_samples = 4
eval_temperature = 1.0
sampling = {{ temperature = 1.0, max_tokens = 200, stop = {stop} }}

[inference]
max_batch = 512
torch_threads = 1

[trainer]
lr = 1e-3
torch_threads = 1
"""


def register_env(root: Path) -> str:
    """PYTHONPATH for the services on which `bench_digits` is this module's `Digits`: a copy of this
    file and a dist-info whose entry point names it (bench/ itself is not put on the path)."""
    info = root / "offbeat_bench_env-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: offbeat-bench-env\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[offbeat.envs]\nbench_digits = offbeat_bench_env:Digits\n")
    shutil.copyfile(__file__, root / "offbeat_bench_env.py")
    return os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)


def union_s(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def measure(dsn: str, run_id: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        steps = conn.execute(
            "SELECT step, metrics, extract(epoch FROM started_at), extract(epoch FROM finished_at) "
            "FROM trainer_steps WHERE run_id=%s AND NOT rolled_back ORDER BY step",
            (run_id,),
        ).fetchall()
        spans = conn.execute(
            "SELECT extract(epoch FROM requested_at), extract(epoch FROM generated_at) FROM trajectories "
            "WHERE run_id=%s AND requested_at IS NOT NULL AND generated_at IS NOT NULL",
            (run_id,),
        ).fetchall()
        (staleness, lengths) = conn.execute(
            "SELECT avg(staleness), array_agg(completion_tokens) FROM trajectories "
            "WHERE run_id=%s AND status='trained'",
            (run_id,),
        ).fetchone()
        # selection by finishing order: lengths of what was generated against what was trained,
        # overall by fate and among the samples of the first policy versions (the same policy
        # whatever the staleness bound, so a difference there is selection, not learning)
        by_status = conn.execute(
            "SELECT status, count(*), percentile_disc(0.5) WITHIN GROUP (ORDER BY completion_tokens) "
            "FROM trajectories WHERE run_id=%s AND NOT eval AND completion_tokens IS NOT NULL GROUP BY 1",
            (run_id,),
        ).fetchall()
        early = conn.execute(
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY completion_tokens), "
            "percentile_disc(0.5) WITHIN GROUP (ORDER BY completion_tokens) FILTER (WHERE status='trained'), "
            "count(*), count(*) FILTER (WHERE status='trained') "
            "FROM trajectories WHERE run_id=%s AND NOT eval AND completion_tokens IS NOT NULL "
            "AND first_version <= %s",
            (run_id, EARLY_VERSIONS),
        ).fetchone()
        (ready,) = conn.execute(
            "SELECT extract(epoch FROM live_at) FROM policy_versions WHERE run_id=%s AND version=0",
            (run_id,),
        ).fetchone()
        last = conn.execute(
            "SELECT version FROM policy_versions WHERE run_id=%s AND status='active' ORDER BY step DESC, "
            "version DESC LIMIT 1",
            (run_id,),
        ).fetchone()[0]
        evals = [
            r
            for (r,) in conn.execute(
                "SELECT reward FROM trajectories WHERE run_id=%s AND eval AND first_version=%s "
                "AND reward IS NOT NULL",
                (run_id, last),
            ).fetchall()
        ]
    # from the moment inference serves the base model (the services' start-up is not the run's)
    t0 = float(ready) if ready is not None else min(float(a) for a, _ in spans)
    t_end = float(steps[-1][3])
    wall = t_end - t0
    # trainer busy: step 1 from its start; later steps from the end of the previous report minus
    # the wait for their batch (what remained of the previous commit counts as busy too)
    busy = float(steps[0][3]) - float(steps[0][2])
    for prev, cur in itertools.pairwise(steps):
        busy += max(0.0, float(cur[3]) - float(prev[3]) - float(cur[1].get("wait_for_batch_s", 0.0)))
    inference_busy = union_s(
        [(max(float(a), t0), min(float(b), t_end)) for a, b in spans if float(a) < t_end and float(b) > t0]
    )
    lengths = sorted(int(x) for x in lengths or [])
    return {
        "steps": len(steps),
        "wall_s": round(wall, 2),
        "train_s": round(busy, 2),
        "trainer_idle": round(1 - busy / wall, 3),
        "inference_idle": round(1 - inference_busy / wall, 3),
        "staleness_mean": round(float(staleness or 0.0), 3),
        "eval": round(statistics.fmean(evals), 4) if evals else None,
        "eval_se": round(statistics.stdev(evals) / math.sqrt(len(evals)), 4) if len(evals) > 1 else None,
        "eval_count": len(evals),
        "train_reward_last": round(float(steps[-1][1].get("reward_mean", 0.0)), 4),
        "completion_tokens_p50_p99_max": [
            lengths[len(lengths) // 2],
            lengths[min(len(lengths) - 1, int(len(lengths) * 0.99))],
            lengths[-1],
        ]
        if lengths
        else [],
        "lengths_by_status": {status: [n, p50] for status, n, p50 in by_status},
        "early_generated_p50_trained_p50_n_trained": list(early),
    }


def run_once(
    config: Path, run_id: str, k: int, seed: int, *, nats_url: str, database_url: str, env: dict[str, str]
) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "offbeat"),
            "run",
            str(config),
            "--set",
            f"run.id={json.dumps(run_id)}",
            "--set",
            f"run.max_staleness={k}",
            "--set",
            f"run.seed={seed}",
            "--nats-url",
            nats_url,
            "--database-url",
            database_url,
            "--no-progress",
            "--no-report",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    if proc.returncode != 0:
        raise SystemExit(f"offbeat run ({run_id}) exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    figures = measure(database_url.replace("postgresql+asyncpg", "postgresql"), run_id)
    figures["process_s"] = round(time.monotonic() - started, 1)
    return figures


PLAN = [
    ("k0", 0, 0),
    ("k2", 2, 0),
    ("k1", 1, 0),
    ("k4", 4, 0),
    ("k2_b", 2, 0),
    ("k0_b", 0, 0),
    ("k0_seed1", 0, 1),
]
"""(name, max_staleness, seed) in the order run: k0 and k2 twice, back to back in both orders, so
a change in the machine's load between runs weighs on both sides of the goal's ratio."""


def phases(sync: dict[str, Any]) -> tuple[float, float, float]:
    """(T_gen, T_train, ideal speedup) of a synchronous run."""
    t_train = sync["train_s"]
    t_gen = sync["wall_s"] - t_train
    return t_gen, t_train, (t_gen + t_train) / max(t_gen, t_train)


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rounds = [(runs["k0"], runs["k2"]), (runs["k0_b"], runs["k2_b"])]
    speedups = [sync["wall_s"] / k2["wall_s"] for sync, k2 in rounds]
    ideals = [phases(sync)[2] for sync, _ in rounds]
    sync_wall = statistics.fmean(sync["wall_s"] for sync, _ in rounds)
    sync = runs["k0"]
    seed_spread = abs(sync["eval"] - runs["k0_seed1"]["eval"])
    async_spread = abs(runs["k2"]["eval"] - runs["k2_b"]["eval"])  # same run, twice: order varies
    t_gen, t_train, _ = phases(sync)
    out: dict[str, Any] = {
        "steps": STEPS,
        "sync_gen_s": round(t_gen, 2),
        "sync_train_s": round(t_train, 2),
        "ideal_speedup": round(statistics.fmean(ideals), 3),
        "eval_seed_spread": round(seed_spread, 4),
        "eval_async_spread": round(async_spread, 4),
    }
    gaps = []
    for k in SETTINGS:
        names = [n for n, kk, seed in PLAN if kk == k and seed == 0]
        mean = {
            f: statistics.fmean(runs[n][f] for n in names)
            for f in ("wall_s", "trainer_idle", "inference_idle")
        }
        if k:
            out[f"speedup_k{k}"] = round(
                statistics.fmean(speedups) if k == 2 else sync_wall / mean["wall_s"], 3
            )
            r = runs[f"k{k}"]
            noise = max(
                2 * math.hypot(sync["eval_se"] or 0.0, r["eval_se"] or 0.0), seed_spread, async_spread
            )
            gaps.append(abs(r["eval"] - sync["eval"]) / noise if noise else math.inf)
        out[f"k{k}_wall_s"] = round(mean["wall_s"], 2)
        out[f"k{k}_trainer_idle"] = round(mean["trainer_idle"], 3)
        out[f"k{k}_inference_idle"] = round(mean["inference_idle"], 3)
        out[f"k{k}_staleness_mean"] = runs[f"k{k}"]["staleness_mean"]
        out[f"k{k}_eval"] = runs[f"k{k}"]["eval"]
        out[f"k{k}_early_generated_trained_p50"] = runs[f"k{k}"]["early_generated_p50_trained_p50_n_trained"][
            :2
        ]
    ratios = [sp / ideal for sp, ideal in zip(speedups, ideals, strict=True)]
    out["k2_vs_ideal_rounds"] = [round(x, 3) for x in ratios]
    out["k2_vs_ideal"] = round(statistics.fmean(ratios), 3)
    out["eval_gap_vs_noise"] = round(max(gaps), 3)
    return out


def main() -> None:
    from offbeat.infra import Infra

    with tempfile.TemporaryDirectory(prefix="offbeat-bench-async-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "PYTHONPATH": register_env(root / "envs"), "OFFBEAT_ADMIN_TOKEN": "bench"}
        config = root / "run.toml"
        config.write_text(CONFIG.format(state=root / "state", steps=STEPS, stop=json.dumps(STOP)))
        infra = Infra.up(root / "state" / "infra")
        load = [os.getloadavg()[0]]
        try:
            runs: dict[str, dict[str, Any]] = {}
            for name, k, seed in PLAN:
                runs[name] = run_once(
                    config,
                    f"async-{name.replace('_', '-')}",
                    k,
                    seed,
                    nats_url=infra.nats.url,
                    database_url=infra.postgres.url,
                    env=env,
                )
                load.append(os.getloadavg()[0])
                print(f"{name}: {json.dumps(runs[name])} (load average {load[-1]:.1f})", flush=True)
        finally:
            infra.down()
    # the machine's 1-minute load average after each run: on 2 cores, more than ~3 means other
    # work took CPU from these runs and the ratios are noisy
    print(json.dumps(summarize(runs) | {"load_avg": [round(x, 1) for x in load]}))


if __name__ == "__main__":
    main()
