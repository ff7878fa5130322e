"""`offbeat run`'s progress against a real ledger: the final eval is waited for until it is whole."""

from __future__ import annotations

import time

import pytest

from offbeat.config import RunConfig, RunSection
from offbeat.ledger import Ledger
from offbeat.progress import Progress

pytestmark = pytest.mark.integration


async def test_the_final_eval_is_waited_for_until_no_eval_sample_is_on_its_way(
    ledger: Ledger, run_id: str
) -> None:
    # the ledger's eval reward of a version is the mean of its samples scored so far, so a run
    # that stopped at the first one reported the final eval of a few samples
    await ledger.upsert_run(run_id, config={})
    await ledger.upsert_trainer_steps(
        [{"run_id": run_id, "step": 2, "version": 2, "consumed": 8, "dropped": 0, "metrics": {}}]
    )
    version = {"run_id": run_id, "version": 2, "step": 2, "parent": 1, "uri": "", "sha256": ""}
    await ledger.upsert_policy_versions([{**version, "eval_reward": 0.5, "eval_count": 1}])
    row = {"run_id": run_id, "trajectory_id": f"{run_id}-e1", "group_id": "e", "eval": True}
    await ledger.upsert_trajectories([{**row, "status": "evaluated", "reward": 0.5, "first_version": 2}])
    await ledger.upsert_trajectories([{**row, "trajectory_id": f"{run_id}-e2", "status": "generated"}])
    progress = Progress(RunConfig(run=RunSection(id=run_id, max_steps=2)), ledger, None, live=False)

    started = time.monotonic()
    await progress.wait_final_eval(timeout_s=2.5)
    assert time.monotonic() - started >= 2.5, "stopped waiting with an eval sample still being generated"

    await ledger.upsert_trajectories([{**row, "trajectory_id": f"{run_id}-e2", "status": "evaluated"}])
    started = time.monotonic()
    await progress.wait_final_eval(timeout_s=30)
    assert time.monotonic() - started < 5, "kept waiting after the eval was whole"


async def test_the_summary_says_why_samples_were_not_trained_most_common_first(
    ledger: Ledger, run_id: str
) -> None:
    await ledger.upsert_run(run_id, config={})
    rows = [("trained", None)] * 5 + [("discarded_stale", "stale")] * 2
    rows += [("failed", "dead letter from scorer: delivered 5 times and never acked")] * 3
    rows += [("failed", "reward_failed:sandbox_error")] + [("evaluated", None)] * 4
    await ledger.upsert_trajectories(
        [
            {"run_id": run_id, "trajectory_id": f"{run_id}-{i}", "group_id": "g", "status": s, "reason": r}
            for i, (s, r) in enumerate(rows)
        ]
    )
    progress = Progress(RunConfig(run=RunSection(id=run_id, max_steps=2)), ledger, None, live=False)
    summary = await progress.summary()
    assert (
        "not trained, most common: 3 failed (dead letter from scorer: delivered 5 times and never acked); "
        "2 discarded_stale (stale); 1 failed (reward_failed:sandbox_error)"
    ) in summary, summary


def test_the_summary_compares_first_and_last_train_rewards_and_counts_steps_without_gradient() -> None:
    from offbeat.progress import train_trend

    rewards = [0.2, 0.3, 0.25, 0.0, 0.0, 0.0, 0.5, 0.6, 0.55, 0.0, 0.0, 0.0]
    history = [
        (step, step, {"reward_mean": r, "consumed": 64.0, "trained_sequences": 0.0 if r == 0 else 40.0})
        for step, r in enumerate(rewards, start=1)
    ]
    assert train_trend(history) == [
        "train reward: 0.250 (steps 1-2) -> 0.000 (steps 11-12)",
        "no gradient in 6 of 12 steps (every group's rewards equal), the last at step 12",
    ]
    all_dropped = [
        (13, 13, {"reward_mean": 0.0, "consumed": 64.0, "dropped": 64.0, "trained_sequences": 0.0})
    ]
    assert train_trend(history + all_dropped)[1].startswith("no gradient in 6 of 13 steps")
    assert train_trend(history[:3]) == ["train reward: 0.200 (step 1) -> 0.250 (step 3)"]
    assert train_trend([(1, 1, {})]) == []
