"""Shared helpers of the sandbox tests (imported by conftest and the test modules)."""

from __future__ import annotations

import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from offbeat.sandbox_client import SandboxClient
from offbeat.v1 import sandbox_pb2 as pb

SECRET = "sandbox-secret-7d1f0c2e9a"
WORKERS = 2
PREFIX = "sbxtest"
SUBJECT = f"{PREFIX}.sandbox.exec"


@dataclass
class RunningService:
    proc: subprocess.Popen[bytes]
    health_port: int
    uid_base: int
    workers: int
    config_path: Path
    log_path: Path

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def worker_uids(self) -> range:
        return range(self.uid_base, self.uid_base + self.workers)


async def answers_normally(client: SandboxClient) -> None:
    """The property every attack test ends with: the next request is served as if nothing happened."""
    result = await client.run("import os\nprint(1, sorted(os.listdir('/tmp/w')))")
    assert result.status == pb.EXEC_STATUS_OK, result
    assert result.stdout == b"1 ['main.py']\n", result.stdout
