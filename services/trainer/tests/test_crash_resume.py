"""SIGKILL the trainer mid-step and between steps, `--resume`, and audit the accounting.

Kills: after step 2's checkpoint (nothing acked), externally while waiting for data, after
training step 3 but before its checkpoint (mid-step), and while acking step 3's messages.

Real nats-server, real `offbeat-trainer` processes, a real tiny model. The kills land at exact
points through `OFFBEAT_TRAINER_FAULT` (the process SIGKILLs itself there), plus one external
SIGKILL while the trainer waits for data.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from offbeat_trainer.checkpoint import read_state

from offbeat.testing import wait_for
from offbeat.v1 import policy_pb2

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _reports(bus) -> list[policy_pb2.TrainerStep]:  # type: ignore[no-untyped-def]
    """Every step report stored in the stream (duplicates were refused by msg id)."""
    sub = await bus.js.pull_subscribe(bus.subjects.trainer_step, durable=None)
    out = []
    while True:
        try:
            msgs = await sub.fetch(100, timeout=0.5)
        except Exception:
            break
        out += [policy_pb2.TrainerStep.FromString(m.data) for m in msgs]
    await sub.unsubscribe()
    return out


def _state(state_dir: Path) -> dict:  # type: ignore[type-arg]
    root = state_dir / "trainer"
    latest = sorted(p for p in root.iterdir() if p.name.startswith("ckpt-"))[-1]
    return json.loads(read_state(latest).to_json())  # type: ignore[no-any-return]


def _step(state_dir: Path) -> int:
    """The newest checkpoint's step; -1 before the first."""
    root = state_dir / "trainer"
    if not root.is_dir() or not any(p.name.startswith("ckpt-") for p in root.iterdir()):
        return -1
    return int(_state(state_dir)["step"])


async def _wait_exit(proc, timeout_s: float = 180) -> int:  # type: ignore[no-untyped-def]
    await wait_for(lambda: proc.poll() is not None, timeout_s=timeout_s, interval_s=0.2)
    return proc.returncode  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("optimizer_every", "overlap"), [(1, True), (3, False)], ids=["full-overlapped", "light"]
)
async def test_sigkill_mid_step_and_between_steps_then_resume_trains_each_once(
    bus,
    nats_url,
    run_id,
    service_config_file,
    tiny_model,
    tmp_path,
    make_scored,
    launch_trainer,
    optimizer_every,
    overlap,
):
    """With `optimizer_every = 3`, the checkpoints of steps 1, 2 and 4 are light: the resume after
    the first kill starts from one (step 2, optimizer state of step 0's). With `overlap_commit`,
    the kills land while the commit runs beside the next step."""
    scored, start_trainer = make_scored, launch_trainer  # type: ignore[no-untyped-def]
    state_dir = tmp_path / "state"
    sets = [
        f"trainer.optimizer_every={optimizer_every}",
        f"trainer.overlap_commit={str(overlap).lower()}",
        f"run.id={run_id}",
        f"model.path={tiny_model}",
        "run.group_size=2",
        "run.groups_per_step=2",
        "run.max_steps=5",
        "run.max_staleness=100",
        "trainer.lr=1e-3",
        "trainer.weights_every=2",
        "trainer.heartbeat_s=1.0",
        "bus.ack_wait_s=3",
    ]
    log = tmp_path / "trainer.log"
    ids: list[str] = []
    msgs = []
    for g in range(8):  # 8 groups of 2 -> 4 steps of training data
        for k in range(2):
            tid = f"g{g}-{k}"
            # group 3 member 1 failed its reward: masked, reported as reward_failed
            status = 5 if (g, k) == (3, 1) else 1
            msgs.append(scored(run_id, tid, f"g{g}", group_size=2, reward=float(k + g % 2), status=status))
            ids.append(tid)
    msgs.append(scored(run_id, "eval-0", "ge", group_size=1, reward=1.0, eval=True))
    for m in msgs[:8]:  # first half, so the trainer has to wait between steps
        await bus.publish(bus.subjects.rollout_scored, m, msg_id=f"scored:{m.completion.trajectory_id}")

    # 1. killed right after step 2's checkpoint: durable, nothing announced or acked
    proc = start_trainer(
        service_config_file, nats_url, sets, log=log, env={"OFFBEAT_TRAINER_FAULT": "after_checkpoint:2"}
    )
    assert await _wait_exit(proc) == -signal.SIGKILL, log.read_text()[-3000:]
    assert _state(state_dir)["step"] == 2
    latest = sorted((state_dir / "trainer").glob("ckpt-*"))[-1]
    assert (latest / "optimizer.pt").is_file() == (optimizer_every == 1)

    # 2. resume: the held messages come back and must be skipped; then killed by an external
    #    SIGKILL while waiting for data (between steps)
    proc = start_trainer(service_config_file, nats_url, sets, resume=True, log=log)
    await wait_for(lambda: "trainer ready" in log.read_text(), timeout_s=120)

    async def all_acked() -> bool:
        return await bus.consumer_pending("trainer") == (0, 0)

    await wait_for(all_acked, timeout_s=60)
    proc.send_signal(signal.SIGKILL)
    assert await _wait_exit(proc) == -signal.SIGKILL
    assert _state(state_dir)["step"] == 2

    # 3. the rest of the data arrives; resume, killed mid-step 3 (trained, not durable)
    for m in msgs[8:]:
        await bus.publish(bus.subjects.rollout_scored, m, msg_id=f"scored:{m.completion.trajectory_id}")
    proc = start_trainer(
        service_config_file,
        nats_url,
        sets,
        resume=True,
        log=log,
        env={"OFFBEAT_TRAINER_FAULT": "before_checkpoint:3"},
    )
    assert await _wait_exit(proc) == -signal.SIGKILL, log.read_text()[-3000:]
    assert _state(state_dir)["step"] == 2

    # 4. resume, killed while acking step 3's messages (one acked, the rest not)
    proc = start_trainer(
        service_config_file, nats_url, sets, resume=True, log=log, env={"OFFBEAT_TRAINER_FAULT": "mid_ack:3"}
    )
    assert await _wait_exit(proc) == -signal.SIGKILL, log.read_text()[-3000:]
    assert _state(state_dir)["step"] == 3

    # 5. resume to the end of the data (4 steps), then stop it
    proc = start_trainer(service_config_file, nats_url, sets, resume=True, log=log)
    await wait_for(lambda: _state(state_dir)["step"] == 4, timeout_s=120)
    await wait_for(all_acked, timeout_s=60)
    proc.send_signal(signal.SIGTERM)
    assert await _wait_exit(proc) == 0, log.read_text()[-3000:]

    state = _state(state_dir)
    consumed, dropped = state["consumed"], state["dropped"]
    assert len(consumed) == len(set(consumed)), "a trajectory was trained twice"
    assert not set(consumed) & set(dropped)
    assert set(consumed) | set(dropped) == set(ids), f"lost: {set(ids) - set(consumed) - set(dropped)}"
    assert dropped == {"g3-1": "reward_failed:error"}
    assert "eval-0" not in consumed

    reports = await _reports(bus)
    # in step order: a step's report goes out while the next step trains, never after its report
    assert [r.step for r in reports] == [1, 2, 3, 4], [r.step for r in reports]
    trained = [t for r in reports for t in r.consumed_trajectory_ids]
    assert sorted(trained) == sorted(consumed)
    assert [d.trajectory_id for r in reports for d in r.dropped] == ["g3-1"]
    # versions: 0 (base), 1 after step 2, 2 after step 4; head is 2 with parent 1
    head = await bus.get_head()
    assert head is not None and (head.version, head.step, head.parent) == (2, 4, 1)
    assert sorted(int(v) for v in state["versions"]) == [0, 1, 2]


async def test_a_member_that_left_its_group_before_a_restart_still_counts_after_it(
    bus, nats_url, run_id, service_config_file, tiny_model, tmp_path, make_scored, launch_trainer
):
    """b-0 is announced LOST (the orchestrator's notice) and dropped; its ack goes out with step 1,
    so after a SIGKILL it is never redelivered. Its sibling b-1 arrives only after the restart: the
    group is complete only if the checkpoint remembered that b-0 left it."""
    scored, start_trainer = make_scored, launch_trainer  # type: ignore[no-untyped-def]
    from offbeat.v1 import rollout_pb2

    state_dir = tmp_path / "state"
    sets = [
        f"run.id={run_id}",
        f"model.path={tiny_model}",
        "run.group_size=2",
        "run.groups_per_step=1",
        "run.max_steps=3",
        "run.max_staleness=100",
        "trainer.heartbeat_s=1.0",
        "bus.ack_wait_s=3",
    ]
    log = tmp_path / "trainer.log"
    lost = rollout_pb2.ScoredTrajectory(
        completion=rollout_pb2.RolloutCompletion(
            run_id=run_id, trajectory_id="b-0", group_id="b", group_size=2
        ),
        status=rollout_pb2.REWARD_STATUS_LOST,
        status_reason="dead letter from scorer: rubric crashed",
    )
    first = [lost] + [scored(run_id, f"a-{k}", "a", group_size=2, reward=float(k)) for k in range(2)]
    for m in first:
        await bus.publish(bus.subjects.rollout_scored, m, msg_id=f"scored:{m.completion.trajectory_id}")

    async def all_acked() -> bool:
        return await bus.consumer_pending("trainer") == (0, 0)

    proc = start_trainer(service_config_file, nats_url, sets, log=log)
    try:
        await wait_for(lambda: _step(state_dir) == 1, timeout_s=120)
        await wait_for(all_acked, timeout_s=60)
    finally:
        proc.send_signal(signal.SIGKILL)  # also when a wait failed: no trainer outlives the test
    assert await _wait_exit(proc) == -signal.SIGKILL
    assert _state(state_dir)["departed"] == {"b": [2, ["b-0"]]}

    sibling = scored(run_id, "b-1", "b", group_size=2, reward=1.0)
    await bus.publish(bus.subjects.rollout_scored, sibling, msg_id="scored:b-1")
    proc = start_trainer(service_config_file, nats_url, sets, resume=True, log=log)
    try:
        await wait_for(lambda: _step(state_dir) == 2, timeout_s=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        await _wait_exit(proc)
    state = _state(state_dir)
    assert state["consumed"] == ["a-0", "a-1", "b-1"]
    assert state["dropped"] == {"b-0": "lost"}
    assert state["departed"] == {}
    reports = sorted(await _reports(bus), key=lambda r: r.step)
    assert [[d.trajectory_id for d in r.dropped] for r in reports] == [["b-0"], []]
    assert [d.reason for d in reports[0].dropped] == ["lost"]
