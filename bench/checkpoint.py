"""What making a step durable costs the trainer: a full checkpoint against a light one, same run.

The trainer writes a checkpoint after every step before it acks the step's messages. A full one
gathers and writes the model and the AdamW state (twice the model); a light one
(`[trainer] optimizer_every` > 1, between full ones) writes the model only. Both also put the
weights in the file store (a hard link to the checkpoint's file) as a version would be.

For the tiny test model and for `qwen05b` (shaped like Qwen/Qwen2.5-0.5B, bfloat16, random
weights, as in `bench/weights.py`), after one real training step, alternating 3 rounds each:
- `<m>_full_commit_s`: `TrainCore.full_state` + `save_weights` + `FileWeightStore.put` +
  `Checkpoints.save` with the optimizer, fsyncs included (what the trainer's commit does);
- `<m>_light_commit_s`: `TrainCore.model_state` + the same, without the optimizer;
- `<m>_light_vs_full`: their ratio; `<m>_every10_vs_full`: the mean commit at
  `optimizer_every = 10` (one full, nine light) over the full one;
- `<m>_full_mb`, `<m>_light_mb`: bytes written per checkpoint.

Medians; the machine is shared, so only the same-run ratios mean much. Last line: one JSON object.
Not covered: sharded (FSDP) gathers, network filesystems, the accounting in `state.json` (the
same in both).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from offbeat_trainer.batching import Trajectory
from offbeat_trainer.checkpoint import Checkpoints, TrainerState, save_weights
from offbeat_trainer.train import CoreSettings, TrainCore, load_model
from weights import build_qwen05b

from offbeat.tinymodel import build_tiny_model
from offbeat.weights import FileWeightStore

ROUNDS = 3


def samples(vocab: int) -> list[Trajectory]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(4):
        ids = torch.randint(5, min(vocab, 30_000), (48,), generator=g).tolist()
        out.append(
            Trajectory(
                trajectory_id=f"t{i}",
                group_id="g",
                group_size=4,
                prompt_ids=ids[:16],
                completion_ids=ids[16:],
                inference_logprobs=[-5.0] * 32,
                reward=float(i % 2),
                status="ok",
                oldest_version=0,
                advantage=float(i % 2) - 0.5,
            )
        )
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def commit(core: TrainCore, ckpts: Checkpoints, store: FileWeightStore, version: int, *, full: bool) -> float:
    started = time.perf_counter()
    model_sd, opt_sd = core.snapshot(full, keep=False)  # as the trainer's commit takes it
    tmp = save_weights(model_sd, ckpts.root / ".weights-bench.safetensors", cloned=True)
    asyncio.run(store.put(tmp, run_id="bench", version=version))
    ckpts.save(
        TrainerState(step=version), weights_file=tmp, optimizer=opt_sd, scheduler=core.scheduler.state_dict()
    )
    return time.perf_counter() - started


def measure(name: str, model_dir: Path, dtype: str, tmp: Path) -> dict[str, Any]:
    model = load_model(str(model_dir), dtype=dtype)
    core = TrainCore(model, CoreSettings(lr=1e-5, autocast_bf16=False))
    core.step(samples(int(model.get_input_embeddings().num_embeddings)))  # AdamW now has its moments
    ckpts = Checkpoints(tmp / f"{name}-ckpt", keep=2)
    store = FileWeightStore(tmp / f"{name}-store")
    times: dict[bool, list[float]] = {True: [], False: []}
    size: dict[bool, int] = {}
    version = 0
    for _ in range(ROUNDS):
        for full in (True, False):
            version += 1
            times[full].append(commit(core, ckpts, store, version, full=full))
            size[full] = dir_bytes(ckpts.root / (ckpts.latest() or ""))
            print(f"{name} {'full' if full else 'light'}: {times[full][-1]:.3f}s", flush=True)
    full_s, light_s = statistics.median(times[True]), statistics.median(times[False])
    del core, model
    return {
        f"{name}_full_commit_s": round(full_s, 4),
        f"{name}_light_commit_s": round(light_s, 4),
        f"{name}_light_vs_full": round(light_s / full_s, 3),
        f"{name}_every10_vs_full": round((full_s + 9 * light_s) / 10 / full_s, 3),
        f"{name}_full_mb": round(size[True] / 1e6, 1),
        f"{name}_light_mb": round(size[False] / 1e6, 1),
    }


def main() -> None:
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tiny = build_tiny_model(tmp / "tiny", hidden_size=128, layers=4, heads=4, kv_heads=2)
        figures.update(measure("tiny", tiny, "float32", tmp))
        figures.update(measure("qwen05b", build_qwen05b(tmp / "qwen05b"), "bfloat16", tmp))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
