"""Fixtures of the trainer's tests: a tiny Qwen2 model built once per session, and helpers that
make scored trajectories and run the real `offbeat-trainer` console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from offbeat.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, layers=2)


def scored(
    run_id: str,
    tid: str,
    gid: str,
    *,
    group_size: int,
    reward: float,
    version: int = 0,
    eval: bool = False,
    status: int = 1,
    prompt_len: int = 6,
    completion_len: int = 5,
    seed: int = 0,
):  # type: ignore[no-untyped-def]
    from offbeat.v1 import rollout_pb2

    base = (seed * 7919 + sum(map(ord, tid))) % 200
    prompt = [(base + 3 * i) % 250 + 5 for i in range(prompt_len)]
    completion = [(base + 11 * i) % 250 + 5 for i in range(completion_len)]
    return rollout_pb2.ScoredTrajectory(
        completion=rollout_pb2.RolloutCompletion(
            run_id=run_id,
            trajectory_id=tid,
            request_id=f"r-{gid}",
            group_id=gid,
            env="test",
            prompt_key=gid,
            group_size=group_size,
            prompt_token_ids=prompt,
            completion_token_ids=completion,
            logprobs=[-5.5] * completion_len,
            finish_reason="stop",
            version_spans=[rollout_pb2.VersionSpan(version=version, start=0, end=completion_len)],
            eval=eval,
        ),
        reward=reward,
        status=status,  # type: ignore[arg-type]
    )


def start_trainer(
    config: Path,
    nats_url: str,
    sets: list[str],
    *,
    resume: bool = False,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    import os

    args = [str(BIN / "offbeat-trainer"), "--config", str(config), "--nats-url", nats_url]
    for s in sets:
        args += ["--set", s]
    if resume:
        args.append("--resume")
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


@pytest.fixture
def make_scored():  # type: ignore[no-untyped-def]
    return scored


@pytest.fixture
def launch_trainer():  # type: ignore[no-untyped-def]
    return start_trainer
