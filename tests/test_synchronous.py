"""`max_staleness = 0` is synchronous RL: `offbeat run` against a plain synchronous loop, same seed.

The reference loop (`reference_run`) is one process with no bus, ledger or staleness. Per step it
draws `groups_per_step` prompts exactly as the orchestrator does (`Mixture(envs, seed)`), gives
each request the scheduler's seed (`request_seed(seed, request number)`; sample i adds i, as
inference does), samples every group at once with the transformers engine in-process (`HFEngine`,
what the inference service runs), decodes and scores with the environment as the scorer does,
takes reward minus the group mean as advantages, runs one `TrainCore.step`, and puts the new
weights into the engine. `python tests/test_synchronous.py CONFIG MODEL_DIR [--set a.b=c]` prints
its curve.

How close the two must be (measured on this 2-core machine, 8-16 steps, the config below):
- Same seed, same base weights: the samples are the same, token for token (per-sample seeded
  sampling; the engine's batch composition moves logits by ~1e-7, far too little to move a
  sampled token), so the reward curves were identical and the per-step entropy (the trainer's,
  over the batch) agreed to 2e-6.
- Seed-to-seed spread of the reference (seeds 0, 1, 2): mean |reward difference| per step
  0.18-0.19, entropy differences 0.1-0.4 by step 8. That is what "noise" means between runs.
- So the tolerance: mean |reward difference| per step <= 0.03 (a sixth of the seed spread, under
  half a sample of 16 per step) and every step's entropy within 1e-3 relative (500x the measured
  same-seed noise, below what one changed step does). A token that does flip (odds ~1e-3 per run
  by the numbers above) would fail the test; it has not been seen.
- The test checks its own power: a reference loop with half the learning rate and one whose
  engine misses every second weight update (samples one step stale) must both fail the comparison.

Not covered: eval requests (they take request numbers too; the config has none), rewards through
the sandbox, `weights_every > 1`, torchrun.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import text

BIN = Path(sys.executable).parent
REWARD_TOLERANCE = 0.03
"""Largest mean |reward difference| per step between the run and the reference (see above)."""
ENTROPY_TOLERANCE = 1e-3
"""Largest relative entropy difference at any step."""
CONFIG = """
[run]
id = "{run_id}"
seed = 0
state_dir = "{state}"
max_staleness = 0
group_size = 8
groups_per_step = 2
max_steps = 8

[bus]
stream_max_bytes = 268435456

[model]
max_model_len = 64

# a reward the untrained tiny model earns about a quarter of the time (any number in the answer),
# so the curve moves from the first step: ~0.1 -> ~0.9 in 8 steps at lr 1e-2
[[envs]]
name = "reasoning_gym:basic_arithmetic"
args = {{ parser = "last_number", system_prompt = "", format = "has_answer", format_weight = 1.0, config = {{ min_terms = 2, max_terms = 2, min_digits = 1, max_digits = 1, operators = ["+"], allow_parentheses = false, allow_negation = false }} }}

[launcher]
tiny_model = {{ hidden_size = 64, layers = 2, heads = 4, kv_heads = 2 }}
progress_interval_s = 1.0
final_eval_timeout_s = 0

[orchestrator]
admin_port = 0
sampling = {{ temperature = 1.0, max_tokens = 8 }}

[inference]
max_batch = 64

[trainer]
lr = 1e-2
"""


async def reference_run(
    config: str | Path, model_path: str | Path, *, sets: Sequence[str] = (), stale_every: int = 0
) -> list[dict[str, float]]:
    """Per-step metrics of the synchronous loop (TrainCore's, plus `reward_mean`). `stale_every =
    s > 0` is a deliberately broken loop: the engine misses the update after every s-th step."""
    import torch
    from offbeat_inference.config import InferenceConfig
    from offbeat_inference.hf_engine import HFEngine
    from offbeat_inference.service import render_prompt, sampling_for
    from offbeat_orchestrator.config import OrchestratorConfig
    from offbeat_orchestrator.prompts import Mixture, set_prompt
    from offbeat_orchestrator.scheduler import request_seed
    from offbeat_trainer.batching import JUDGED, Trajectory
    from offbeat_trainer.checkpoint import save_weights
    from offbeat_trainer.config import TrainerConfig
    from offbeat_trainer.train import CoreSettings, TrainCore, load_model

    from offbeat.config import load_run_config
    from offbeat.envs import load
    from offbeat.v1 import rollout_pb2

    cfg = load_run_config(config, sets=sets)
    run, model = cfg.run, cfg.model
    orch = cfg.section("orchestrator", OrchestratorConfig)
    inf = cfg.section("inference", InferenceConfig)
    tr = cfg.section("trainer", TrainerConfig)
    if orch.eval_every or orch.difficulty_filter or tr.weights_every != 1:
        raise ValueError("the reference covers eval_every = 0, no difficulty filter, weights_every = 1")
    envs = [(spec.name, spec.weight, load(spec.name, **spec.args)) for spec in cfg.envs]
    by_name = {name: env for name, _, env in envs}
    mixture = Mixture(envs, seed=run.seed)
    engine = HFEngine(
        str(model_path),
        dtype=model.dtype,
        capacity=inf.max_batch,
        max_model_len=inf.max_model_len or model.max_model_len,
        max_prefill_tokens=inf.max_prefill_tokens,
    )
    await engine.start()
    torch.manual_seed(run.seed)  # as the trainer does
    core = TrainCore(
        load_model(str(model_path), dtype=model.dtype, attn_implementation=tr.attn_implementation),
        CoreSettings.from_config(tr),
    )
    s = orch.sampling
    seq = 0
    curve: list[dict[str, float]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for step in range(run.max_steps):
                requests = []
                for _ in range(run.groups_per_step):
                    seq += 1
                    name, example = mixture.draw()
                    request = rollout_pb2.RolloutRequest(
                        request_id=f"g{seq}",
                        group_id=f"g{seq}",
                        env=name,
                        prompt_key=example.key,
                        n=run.group_size,
                        sampling=rollout_pb2.SamplingParams(
                            temperature=s.temperature,
                            top_p=s.top_p,
                            top_k=s.top_k,
                            max_tokens=s.max_tokens,
                            stop=s.stop,
                            seed=request_seed(run.seed, seq),
                        ),
                    )
                    set_prompt(request, example.prompt)
                    requests.append((request, example, render_prompt(engine.tokenizer, request)))
                generations = await asyncio.gather(
                    *(
                        engine.generate(prompt, sampling_for(r, i, default_max_tokens=inf.max_new_tokens))
                        for r, _, prompt in requests
                        for i in range(r.n)
                    )
                )
                samples: list[Trajectory] = []
                for g, (r, example, prompt) in enumerate(requests):
                    judged = []
                    for gen in generations[g * r.n : (g + 1) * r.n]:
                        text = engine.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
                        reward = await by_name[r.env].score(example, text)
                        if reward.status.value in JUDGED:  # infrastructure failures are masked
                            judged.append((gen, reward))
                    mean = sum(rw.total for _, rw in judged) / max(1, len(judged))
                    samples += [
                        Trajectory(
                            trajectory_id=f"{r.group_id}-{i}",
                            group_id=r.group_id,
                            group_size=r.n,
                            prompt_ids=prompt,
                            completion_ids=list(gen.token_ids),
                            inference_logprobs=list(gen.logprobs),
                            reward=rw.total,
                            status=rw.status.value,
                            oldest_version=step,
                            advantage=rw.total - mean,
                        )
                        for i, (gen, rw) in enumerate(judged)
                    ]
                metrics = core.step(samples)
                metrics["reward_mean"] = sum(t.reward for t in samples) / len(samples)
                curve.append(metrics)
                if stale_every and (step + 1) % stale_every == 0:
                    continue
                weights = save_weights(core.module.state_dict(), Path(tmp) / f"v{step + 1}.safetensors")
                await engine.update_weights(weights, step + 1)
    finally:
        await engine.close()
    return curve


def differences(run: list[dict[str, float]], reference: list[dict[str, float]]) -> list[str]:
    """What makes the two curves more different than the tolerances allow (empty: the same)."""
    if len(run) != len(reference):
        return [f"{len(run)} steps against {len(reference)}"]
    out = []
    gaps = [abs(a["reward_mean"] - b["reward_mean"]) for a, b in zip(run, reference, strict=True)]
    if sum(gaps) / len(gaps) > REWARD_TOLERANCE:
        out.append(f"mean |reward difference| {sum(gaps) / len(gaps):.3f} > {REWARD_TOLERANCE}")
    for step, (a, b) in enumerate(zip(run, reference, strict=True), 1):
        rel = abs(a["entropy"] - b["entropy"]) / abs(b["entropy"])
        if rel > ENTROPY_TOLERANCE:
            out.append(f"step {step}: entropy {a['entropy']:.6f} vs {b['entropy']:.6f}")
    return out


def _table(run: list[dict[str, float]], reference: list[dict[str, float]]) -> str:
    return "\n".join(
        f"  step {i}: reward {a['reward_mean']:.3f} / {b['reward_mean']:.3f}, "
        f"entropy {a['entropy']:.6f} / {b['entropy']:.6f}"
        for i, (a, b) in enumerate(zip(run, reference, strict=False), 1)
    )


@pytest.mark.integration
@pytest.mark.slow
async def test_max_staleness_zero_follows_the_reward_curve_of_a_synchronous_loop(
    tmp_path, nats_url, database_url, run_id
):
    from offbeat.ledger import Ledger

    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(run_id=run_id, state=tmp_path / "state"))
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "offbeat"),
        "run",
        str(config),
        "--nats-url",
        nats_url,
        "--database-url",
        database_url,
        "--no-progress",
        "--no-report",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "OFFBEAT_ADMIN_TOKEN": "sync-token"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=600)
    assert proc.returncode == 0, out.decode()[-4000:]

    ledger = Ledger.connect(database_url, pool_size=1)
    try:
        run = [metrics for _, _, metrics in await ledger.step_metrics(run_id)]
        async with ledger.engine.connect() as conn:
            early = (
                await conn.execute(
                    text(
                        "SELECT t.trajectory_id, t.consumed_step FROM trajectories t JOIN policy_versions p "
                        "ON p.run_id = t.run_id AND p.step = t.consumed_step - 1 AND p.status = 'active' "
                        "WHERE t.run_id = :run AND t.status = 'trained' AND t.consumed_step > 1 "
                        "AND t.requested_at < p.live_at"
                    ),
                    {"run": run_id},
                )
            ).all()
    finally:
        await ledger.close()

    model = next((tmp_path / "state" / "models").glob("tiny-*"))
    reference = await reference_run(config, model, sets=[f"model.path={json.dumps(str(model))}"])
    problems = differences(run, reference)
    assert not problems, "\n".join(["run / reference:", _table(run, reference), *problems])
    # synchronous: nothing trained stale, nothing requested before the last step's weights were live
    assert all(m["staleness_max"] == 0 for m in run), [m["staleness_max"] for m in run]
    assert not early, f"requested before the previous step's weights were live: {early[:3]}"

    # the comparison can fail: a loop with half the learning rate, and one sampling stale weights
    for what, kwargs in (
        ("half the learning rate", {"sets": [f"model.path={json.dumps(str(model))}", "trainer.lr=5e-3"]}),
        ("stale weights", {"sets": [f"model.path={json.dumps(str(model))}"], "stale_every": 2}),
    ):
        broken = await reference_run(config, model, **kwargs)  # type: ignore[arg-type]
        assert differences(run, broken), f"a loop with {what} passes for the run:\n{_table(run, broken)}"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the synchronous reference loop; one JSON line per step.")
    p.add_argument("config")
    p.add_argument("model")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--stale-every", type=int, default=0)
    args = p.parse_args(argv)
    sets = [*args.set, f"model.path={json.dumps(args.model)}"]
    curve = asyncio.run(reference_run(args.config, args.model, sets=sets, stale_every=args.stale_every))
    for step, m in enumerate(curve, 1):
        print(json.dumps({"step": step, **{k: round(v, 6) for k, v in m.items()}}))


if __name__ == "__main__":
    main()
