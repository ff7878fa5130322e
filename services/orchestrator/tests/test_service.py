"""The orchestrator as a process (its console script), and `offbeat admin` against it."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from orch_helpers import trajectory_rows
from sqlalchemy import text

from offbeat.infra import free_port
from offbeat.testing import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent


def _healthz(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return {}


NO_TOKEN = {k: v for k, v in os.environ.items() if k != "OFFBEAT_ADMIN_TOKEN"}


def _admin(*args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = NO_TOKEN | {"COLUMNS": "200"}
    if token is not None:
        env["OFFBEAT_ADMIN_TOKEN"] = token
    return subprocess.run(
        [str(BIN / "offbeat"), "admin", *args], capture_output=True, text=True, timeout=120, env=env
    )


async def test_orchestrator_process_records_the_run_dispatches_and_answers_offbeat_admin(
    bus, ledger, nats_url, database_url, run_id, service_config_file
):
    config = service_config_file
    config.write_text(config.read_text() + '\n[[envs]]\nname = "math"\n')
    admin_port, health_port = free_port(), free_port()
    address = f"127.0.0.1:{admin_port}"
    run_dir = str(config.parent / "state" / run_id)
    proc = subprocess.Popen(
        [
            str(BIN / "offbeat-orchestrator"),
            "--config",
            str(config),
            "--nats-url",
            nats_url,
            "--database-url",
            database_url,
            "--set",
            f"run.id={run_id}",
            "--set",
            "run.group_size=2",
            "--set",
            "run.groups_per_step=1",
            "--set",
            "run.max_staleness=0",
            "--set",
            f"orchestrator.admin_port={admin_port}",
            "--set",
            f"orchestrator.health_port={health_port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=NO_TOKEN,  # so it generates one into <state_dir>/<run>/admin.token
    )
    try:
        deadline = time.monotonic() + 120
        while not _healthz(health_port).get("healthy"):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "orchestrator not healthy within 120 s"
            time.sleep(0.2)
        assert _healthz(health_port)["admin_port"] == admin_port

        async with ledger.engine.connect() as conn:
            cfg = (
                await conn.execute(text("SELECT config FROM runs WHERE id = :r"), {"r": run_id})
            ).scalar_one()
        assert cfg["run"]["id"] == run_id and cfg["envs"][0]["name"] == "math"

        async def requested():
            return len(await trajectory_rows(ledger, run_id)) == 2

        await wait_for(requested, timeout_s=60)  # max_staleness = 0: one step's worth (1 group of 2)

        token_file = Path(run_dir) / "admin.token"
        assert token_file.stat().st_mode & 0o077 == 0, "the generated token file is readable by others"
        token = token_file.read_text().strip()
        assert (Path(run_dir) / "admin.address").read_text().strip() == address
        out = _admin("status", "--address", address, "--token-file", str(token_file))
        assert out.returncode == 0, out.stderr
        assert out.stdout == _admin("status", "--run-dir", run_dir).stdout
        for needle in (f"run {run_id}", "trainer step", "groups in flight", "trajectories requested"):
            assert needle in out.stdout, f"{needle!r} not in:\n{out.stdout}"
        assert token not in out.stdout + out.stderr

        watch = subprocess.Popen(
            [
                str(BIN / "offbeat"),
                "admin",
                "watch",
                "--kind",
                "control",
                "--count",
                "1",
                "--run-dir",
                run_dir,
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=NO_TOKEN,
        )
        deadline = time.monotonic() + 120
        while watch.poll() is None and time.monotonic() < deadline:  # until the stream sees a pause
            assert _admin("pause", "--run-dir", run_dir).stdout.strip() == "paused"
            time.sleep(0.5)
        watched, _ = watch.communicate(timeout=10)
        assert watch.returncode == 0 and "control" in watched and "pause" in watched, watched
        status = _admin("status", "--run-dir", run_dir).stdout
        assert re.search(r"paused\W+yes", status), status
        out = _admin("trajectories", "--status", "requested", "--run-dir", run_dir)
        assert out.returncode == 0 and "requested" in out.stdout and out.stdout.count("math") == 2, out.stdout
        assert _admin("policies", "--run-dir", run_dir).returncode == 0
        assert _admin("staleness", "--run-dir", run_dir).returncode == 0

        out = _admin("rollback", "5", "--run-dir", run_dir)
        assert out.returncode == 1 and "NOT_FOUND" in out.stderr
        out = _admin("status", "--address", address, token="wrong")
        assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr and "wrong" not in out.stderr
        assert "came from $OFFBEAT_ADMIN_TOKEN" in out.stderr, "the refusal says which token was sent"
        out = _admin("status", "--address", address)
        assert out.returncode != 0 and "no token" in out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, log.decode()[-3000:]
    assert token not in log.decode(), "the admin token leaked into the log"
