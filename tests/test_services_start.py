"""Every service starts from its console script, reports healthy, serves metrics, stops on SIGTERM."""

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from offbeat.infra import free_port

pytestmark = pytest.mark.integration
SERVICES = ["orchestrator", "inference", "scorer", "sandbox", "trainer"]
BIN = Path(sys.executable).parent


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


@pytest.mark.parametrize("service", SERVICES)
def test_help_is_instant(service):
    exe = BIN / f"offbeat-{service}"
    assert exe.exists(), f"offbeat-{service} is not installed"
    started = time.monotonic()
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--config" in out.stdout
    assert time.monotonic() - started < 10


def test_services_start_report_healthy_and_stop_on_sigterm(
    nats_url, database_url, run_id, service_config_file, tmp_path
):
    from offbeat.tinymodel import build_tiny_model

    model = build_tiny_model(tmp_path / "model", hidden_size=64, layers=2)  # inference loads [model] path
    procs = {}
    ports = {}
    for service in SERVICES:
        ports[service] = free_port()
        procs[service] = subprocess.Popen(
            [
                str(BIN / f"offbeat-{service}"),
                "--config",
                str(service_config_file),
                "--nats-url",
                nats_url,
                "--database-url",
                database_url,
                "--set",
                f"run.id={run_id}",
                "--set",
                f"model.path={model}",
                "--set",
                f"{service}.health_port={ports[service]}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        pending = set(SERVICES)
        while pending and time.monotonic() < deadline:
            for service in list(pending):
                assert procs[service].poll() is None, procs[service].stdout.read().decode()[-3000:]
                code, body = _get(f"http://127.0.0.1:{ports[service]}/healthz")
                if code == 200:
                    assert json.loads(body)["service"] == service
                    pending.discard(service)
            time.sleep(0.2)
        assert not pending, f"not healthy: {pending}"
        code, metrics = _get(f"http://127.0.0.1:{ports['scorer']}/metrics")
        assert code == 200 and b"offbeat_bus" in metrics
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for service, p in procs.items():
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0, f"{service} exited {p.returncode}: {out.decode()[-3000:]}"
            lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
            assert any(line["msg"] == "stopped" for line in lines), service
