"""`offbeat-inference` as a process: configured from the run TOML, serves, drains on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from offbeat.infra import free_port
from offbeat.testing import wait_for
from offbeat.v1 import rollout_pb2

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EXE = Path(sys.executable).parent / "offbeat-inference"


def test_without_a_model_path_it_refuses_to_start(service_config_file):
    out = subprocess.run([EXE, "--config", service_config_file], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "[model] path is empty" in out.stderr


async def test_the_console_script_serves_a_request_and_stops_on_sigterm(
    bus, nats_url, run_id, service_config_file, tiny_model
):
    port = free_port()
    proc = subprocess.Popen(
        [
            EXE,
            "--config",
            str(service_config_file),
            "--nats-url",
            nats_url,
            "--set",
            f"run.id={run_id}",
            "--set",
            f"model.path={tiny_model}",
            "--set",
            "model.max_model_len=256",
            "--set",
            f"inference.health_port={port}",
            "--set",
            "inference.max_batch=4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return bool(json.loads(r.read())["healthy"])
            except OSError:
                return False

        await wait_for(healthy, timeout_s=120, interval_s=0.2)
        received: list[rollout_pb2.RolloutCompletion] = []

        async def on(c: rollout_pb2.RolloutCompletion) -> None:
            received.append(c)

        await bus.subscribe(bus.subjects.rollout_completion, rollout_pb2.RolloutCompletion, on)
        req = rollout_pb2.RolloutRequest(
            run_id=run_id,
            request_id="r1",
            group_id="g1",
            n=2,
            trajectory_ids=["t0", "t1"],
            sampling=rollout_pb2.SamplingParams(temperature=1.0, max_tokens=5, seed=1),
            created_at=time.time(),
        )
        req.chat.messages.add(role="user", content="hi")
        await bus.publish(bus.subjects.rollout_request, req, msg_id="request:r1:0")
        await wait_for(lambda: len(received) == 2, timeout_s=60)
        assert sorted(c.trajectory_id for c in received) == ["t0", "t1"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            assert b"offbeat_inference_completions_total" in r.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, proc.stdout.read().decode()[-3000:]
