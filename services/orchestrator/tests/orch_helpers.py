"""Builders of the bus messages the other services publish, and ledger read helpers, for tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import text

from offbeat.envs import Environment, Example, Reward
from offbeat.v1 import policy_pb2, rollout_pb2


class CountingEnv(Environment):
    """A tiny real environment: prompts `i+i=?`, `n_train` train and 10 eval examples."""

    def __init__(self, n_train: int = 40) -> None:
        self.n_train = n_train

    def examples(self, split: Any = "train", seed: int = 0) -> Iterator[Example]:
        start = 0 if split == "train" else 1000
        count = self.n_train if split == "train" else 10
        order = list(range(start, start + count))
        order = order[seed % count :] + order[: seed % count]
        for i in order:
            yield Example(key=f"{split}-{i}", prompt=f"{i}+{i}=", answer=str(2 * i))

    def get(self, key: str) -> Example:
        i = int(key.split("-")[1])
        return Example(key=key, prompt=f"{i}+{i}=", answer=str(2 * i))

    async def score(self, example: Example, completion: str) -> Reward:
        return Reward(total=float(completion.strip() == example.answer))


def request(
    run_id: str, gid: str, n: int, *, eval_: bool = False, env: str = "count"
) -> rollout_pb2.RolloutRequest:
    return rollout_pb2.RolloutRequest(
        run_id=run_id,
        request_id=gid,
        group_id=gid,
        env=env,
        prompt_key=f"k-{gid}",
        text="1+1=",
        n=n,
        trajectory_ids=[f"{gid}-{i}" for i in range(n)],
        eval=eval_,
        created_at=time.time(),
    )


def completion(
    req: rollout_pb2.RolloutRequest, i: int, *, versions: tuple[int, ...] = (0,), tokens: int = 4
) -> rollout_pb2.RolloutCompletion:
    per = max(1, tokens // len(versions))
    spans = [
        rollout_pb2.VersionSpan(
            version=v, start=j * per, end=tokens if j == len(versions) - 1 else (j + 1) * per
        )
        for j, v in enumerate(versions)
    ]
    return rollout_pb2.RolloutCompletion(
        run_id=req.run_id,
        trajectory_id=req.trajectory_ids[i],
        request_id=req.request_id,
        group_id=req.group_id,
        env=req.env,
        prompt_key=req.prompt_key,
        sample_index=i,
        group_size=req.n,
        prompt_token_ids=[1, 2, 3],
        completion_token_ids=list(range(tokens)),
        logprobs=[-0.5] * tokens,
        finish_reason="stop",
        version_spans=spans,
        eval=req.eval,
        requested_at=req.created_at,
        finished_at=time.time(),
    )


def scored(
    c: rollout_pb2.RolloutCompletion, reward: float, status: int = rollout_pb2.REWARD_STATUS_OK
) -> rollout_pb2.ScoredTrajectory:
    return rollout_pb2.ScoredTrajectory(completion=c, reward=reward, status=status, scored_at=time.time())


def weights(run_id: str, version: int, step: int, parent: int) -> policy_pb2.WeightVersion:
    return policy_pb2.WeightVersion(
        run_id=run_id,
        version=version,
        step=step,
        parent=parent,
        uri=f"file:///w/{version}.safetensors",
        sha256=f"{version:064d}",
        format="safetensors",
        published_at=time.time(),
    )


def live(run_id: str, version: int) -> policy_pb2.PolicyLive:
    return policy_pb2.PolicyLive(run_id=run_id, version=version, replica="r0", ok=True, live_at=time.time())


def step(
    run_id: str,
    n: int,
    *,
    consumed: list[str],
    dropped: list[tuple[str, str]] = (),  # type: ignore[assignment]
    version: int = 0,
    staleness: int = 0,
) -> policy_pb2.TrainerStep:
    return policy_pb2.TrainerStep(
        run_id=run_id,
        step=n,
        version=version,
        consumed_trajectory_ids=consumed,
        dropped=[
            policy_pb2.DroppedTrajectory(trajectory_id=t, reason=r, staleness=staleness + 5)
            for t, r in dropped
        ],
        metrics={"loss": 0.5},
        started_at=time.time(),
        finished_at=time.time(),
        staleness={t: staleness for t in consumed},
        advantages={t: 0.25 for t in consumed},
    )


async def publish(bus: Any, subject: str, message: Any, msg_id: str) -> None:
    await bus.publish(subject, message, msg_id=msg_id)


async def trajectory_rows(ledger: Any, run_id: str) -> dict[str, dict[str, Any]]:
    async with ledger.engine.connect() as conn:
        rows = await conn.execute(text("SELECT * FROM trajectories WHERE run_id = :r"), {"r": run_id})
        return {r.trajectory_id: dict(r._mapping) for r in rows}
