"""The whole loop on the real stack: `offbeat run` with all five services, then the ledger.

Each test runs the launcher as a user would (a child process, the services as its children) on
the session's nats-server and PostgreSQL, with a tiny model and short completions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psycopg
import pytest

from offbeat.v1 import admin_pb2, admin_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent
ENV_ARGS = (
    'args = { parser = "last_number", system_prompt = "", config = { min_terms = 2, max_terms = 2, '
    'min_digits = 1, max_digits = 1, operators = ["+"], allow_parentheses = false, allow_negation = false } }'
)


def write_config(tmp: Path, run_id: str, *, max_staleness: int, max_steps: int, extra: str = "") -> Path:
    path = tmp / "run.toml"
    path.write_text(f"""
[run]
id = "{run_id}"
state_dir = "{tmp / "state"}"
max_staleness = {max_staleness}
group_size = 4
groups_per_step = 2
max_steps = {max_steps}

[bus]
stream_max_bytes = 268435456

[model]
max_model_len = 128

[[envs]]
name = "reasoning_gym:basic_arithmetic"
{ENV_ARGS}

[launcher]
tiny_model = {{ hidden_size = 64, layers = 2, heads = 4, kv_heads = 2 }}
progress_interval_s = 1.0
final_eval_timeout_s = 60

[orchestrator]
admin_port = 0
eval_every = 2
eval_examples = 8
sampling = {{ temperature = 1.0, max_tokens = 4 }}

[inference]
max_batch = 32

[trainer]
lr = 1e-3
{extra}
""")
    return path


def launch(config: Path, nats_url: str, database_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(BIN / "offbeat"),
            "run",
            str(config),
            "--nats-url",
            nats_url,
            "--database-url",
            database_url,
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OFFBEAT_ADMIN_TOKEN": "e2e-token"},
    )


def query(database_url: str, sql: str, *args: object) -> list[tuple]:
    dsn = database_url.replace("postgresql+asyncpg", "postgresql")
    with psycopg.connect(dsn) as conn:
        return list(conn.execute(sql, args).fetchall())


def test_run_trains_to_max_steps_within_the_staleness_bound(tmp_path, nats_url, database_url, run_id):
    config = write_config(tmp_path, run_id, max_staleness=1, max_steps=4)
    proc = launch(config, nats_url, database_url)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    steps = query(database_url, "SELECT step FROM trainer_steps WHERE run_id=%s ORDER BY step", run_id)
    assert [s for (s,) in steps] == [1, 2, 3, 4]
    fates = dict(
        query(database_url, "SELECT status, count(*) FROM trajectories WHERE run_id=%s GROUP BY 1", run_id)
    )
    assert fates.get("trained", 0) >= 4 * 2 * 4 - fates.get("failed", 0)
    over = query(
        database_url,
        "SELECT trajectory_id, staleness FROM trajectories WHERE run_id=%s AND status='trained' AND staleness > 1",
        run_id,
    )
    assert over == [], f"trained beyond max_staleness: {over}"
    # a trajectory trained twice would count twice in the step reports but once in the ledger
    (consumed,) = query(database_url, "SELECT sum(consumed) FROM trainer_steps WHERE run_id=%s", run_id)[0]
    assert consumed == fates["trained"]
    assert "report:" in out and (tmp_path / "state" / "runs" / run_id / "report" / "reward.png").exists()


def _admin(run_dir: Path) -> tuple[admin_pb2_grpc.AdminServiceStub, list[tuple[str, str]]]:
    address_file = run_dir / run_dir.name / "admin.address"  # the orchestrator's <state_dir>/<run>/
    channel = grpc.insecure_channel(address_file.read_text().strip())
    return admin_pb2_grpc.AdminServiceStub(channel), [("authorization", "Bearer e2e-token")]


def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen[str]) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(
                f"offbeat run exited {proc.returncode} while waiting for {what}:\n{out[-4000:]}"
            )
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_pause_resume_and_rollback_on_a_live_run(tmp_path, nats_url, database_url, run_id):
    config = write_config(tmp_path, run_id, max_staleness=1, max_steps=40)
    proc = launch(config, nats_url, database_url)
    try:
        run_dir = tmp_path / "state" / "runs" / run_id

        def step() -> int:
            rows = query(
                database_url,
                "SELECT max(step) FROM trainer_steps WHERE run_id=%s AND NOT rolled_back",
                run_id,
            )
            return int(rows[0][0] or 0)

        _wait(lambda: step() >= 3, 600, "step 3", proc)
        _wait((run_dir / run_id / "admin.address").exists, 30, "the admin address file", proc)
        admin, auth = _admin(run_dir)

        with pytest.raises(grpc.RpcError) as denied:
            admin.GetStatus(admin_pb2.GetStatusRequest(), metadata=[("authorization", "Bearer wrong")])
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED

        assert admin.Pause(admin_pb2.PauseRequest(reason="e2e"), metadata=auth).paused
        requested = lambda: query(  # noqa: E731
            database_url,
            "SELECT count(*) FROM trajectories WHERE run_id=%s AND status <> 'evaluated'",
            run_id,
        )[0][0]
        time.sleep(5)
        before = requested()
        time.sleep(8)
        assert requested() == before, "requests kept going out while paused"
        # roll back while paused: the run cannot race to max_steps before the rollback lands
        assert step() >= 3
        # a target inside the trainer's rollback window (it keeps the newest 8 versions' checkpoints)
        head = query(
            database_url,
            "SELECT max(version) FROM policy_versions WHERE run_id=%s AND status='active'",
            run_id,
        )[0][0]
        target = max(1, head - 2)
        result = admin.Rollback(admin_pb2.RollbackRequest(version=target, reason="e2e"), metadata=auth)
        assert result.version == target
        assert not admin.Resume(admin_pb2.ResumeRequest(reason="e2e"), metadata=auth).paused
        _wait(lambda: requested() > before, 120, "dispatch after resume", proc)
        rolled = query(
            database_url,
            "SELECT version FROM policy_versions WHERE run_id=%s AND status='rolled_back'",
            run_id,
        )
        assert rolled and all(v > target for (v,) in rolled)
        newest_rolled = max(v for (v,) in rolled)

        def next_version() -> list[tuple]:
            return query(
                database_url,
                "SELECT version, parent, status FROM policy_versions WHERE run_id=%s AND version > %s ORDER BY version",
                run_id,
                newest_rolled,
            )

        _wait(
            lambda: any(status == "active" for _, _, status in next_version()),
            600,
            "a version after the rollback",
            proc,
        )
        # a step the trainer finished while the rollback was on its way is published from a rolled-back
        # parent and is rolled back itself; the first active version after the rollback descends from it
        first_active = next((v, parent) for v, parent, status in next_version() if status == "active")
        assert first_active[1] == target, (
            f"version {first_active[0]} after a rollback to {target} has parent {first_active[1]}"
        )
        bad = query(
            database_url,
            "SELECT t.trajectory_id, t.status FROM trajectories t JOIN policy_versions p "
            "ON p.run_id = t.run_id AND p.version = t.first_version "
            "WHERE t.run_id=%s AND p.status='rolled_back' AND t.status IN ('requested','generated','scored')",
            run_id,
        )
        _wait(
            lambda: (
                not query(
                    database_url,
                    "SELECT 1 FROM trajectories t JOIN policy_versions p ON p.run_id = t.run_id AND p.version = t.first_version "
                    "WHERE t.run_id=%s AND p.status='rolled_back' AND t.status IN ('requested','generated','scored')",
                    run_id,
                )
            ),
            60,
            f"trajectories of rolled-back versions to be discarded (left: {bad[:3]})",
            proc,
        )
        discarded = query(
            database_url,
            "SELECT count(*) FROM trajectories WHERE run_id=%s AND status='discarded_rolled_back'",
            run_id,
        )[0][0]
        assert discarded >= 0
        audit = [
            a for (a,) in query(database_url, "SELECT action FROM admin_actions WHERE run_id=%s", run_id)
        ]
        assert {"pause", "resume", "rollback"} <= set(audit)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
