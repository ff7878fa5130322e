"""A follower rank serves its host's /healthz: only with LOCAL_RANK 0, 503 until its rank loop
runs, 200 while it runs, gone when it ends or fails; and a real follower under a gloo group with
a rank 0 that drives it answers on the configured port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from offbeat_trainer import follower, ranks, train
from offbeat_trainer.config import TrainerConfig

from offbeat.config import RunConfig, RunSection

BIN = Path(sys.executable).parent


def _get(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return 0, {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run() -> RunConfig:
    return RunConfig(run=RunSection(id="r"))


def test_only_local_rank_zero_serves_health() -> None:
    config = TrainerConfig(health_host="127.0.0.1", health_port=0)
    assert follower.follower_health(_run(), config, {"RANK": "9", "LOCAL_RANK": "1"}) is None
    health = follower.follower_health(_run(), config, {"RANK": "8", "LOCAL_RANK": "0"})
    assert health is not None
    try:
        code, body = _get(health.port)
        assert code == 503 and body["rank"] == 8 and body["role"] == "follower", body
        health.healthy = True
        code, body = _get(health.port)
        assert code == 200 and body["healthy"] is True and body["health_port"] == health.port
    finally:
        health.close()


@pytest.mark.parametrize("fails", [False, True])
def test_health_follows_the_rank_loop(monkeypatch: pytest.MonkeyPatch, fails: bool) -> None:
    """run_follower's own path with the real HealthServer; the process group, the model and the
    loop are stand-ins that look at /healthz at each stage."""
    port = _free_port()
    seen: dict[str, int] = {}
    monkeypatch.setenv("RANK", "8")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(follower, "setup_logging", lambda *a, **k: None)
    monkeypatch.setattr(ranks, "init_process_group", lambda timeout_s: "cpu")

    def load_model(*args: Any, **kwargs: Any) -> object:
        seen["loading"] = _get(port)[0]
        return object()

    def follow(core: object) -> None:
        seen["following"] = _get(port)[0]
        if fails:
            raise RuntimeError("rank 0 is gone")

    monkeypatch.setattr(train, "load_model", load_model)
    monkeypatch.setattr(train, "TrainCore", lambda model, settings, device: object())
    monkeypatch.setattr(ranks, "follow", follow)
    config = TrainerConfig(health_host="127.0.0.1", health_port=port)
    if fails:
        with pytest.raises(RuntimeError, match="rank 0 is gone"):
            follower.run_follower(_run(), config)
    else:
        follower.run_follower(_run(), config)
    assert seen == {"loading": 503, "following": 200}
    assert _get(port)[0] == 0, "the health server outlived the rank loop"


RANK0 = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from offbeat_trainer.config import TrainerConfig
    from offbeat_trainer.distributed import synthetic_batch
    from offbeat_trainer.ranks import Driver, init_process_group
    from offbeat_trainer.train import CoreSettings, TrainCore, load_model

    torch.manual_seed(0)
    device = init_process_group(120)
    core = TrainCore(load_model(sys.argv[1]), CoreSettings.from_config(TrainerConfig()), device=device)
    driver = Driver(core)
    print("loss", driver.call("step", synthetic_batch(0, groups=2, group_size=2))["loss"], flush=True)
    while not Path(sys.argv[2]).exists():
        time.sleep(0.1)
    driver.stop()
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_a_real_follower_answers_healthz_while_it_follows(tiny_model: Path, tmp_path: Path) -> None:
    """`offbeat-trainer` with RANK=1, LOCAL_RANK=0 (the first process of a pod other than rank 0's)
    in a 2-rank gloo group whose rank 0 is a bare driver: /healthz on the configured port is 200
    while it follows (after a real FSDP step), and it exits 0 on rank 0's stop."""
    health_port, master_port = _free_port(), _free_port()
    config = tmp_path / "run.toml"
    config.write_text(
        f'[run]\nid = "follower"\nstate_dir = "{tmp_path / "state"}"\n[model]\npath = "{tiny_model}"\n'
        f'[trainer]\nhealth_host = "127.0.0.1"\nhealth_port = {health_port}\ndist_timeout_s = 120\n'
    )
    stop = tmp_path / "stop"
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port),
        "LOCAL_RANK": "0",
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cpu = {"CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU even where a GPU is present
    logs = {r: tmp_path / f"rank{r}.log" for r in (0, 1)}
    driver = subprocess.Popen(
        [sys.executable, "-c", RANK0, str(tiny_model), str(stop)],
        env={**env, **cpu, "RANK": "0"},
        stdout=open(logs[0], "wb"),
        stderr=subprocess.STDOUT,
    )
    follower_proc = subprocess.Popen(
        [str(BIN / "offbeat-trainer"), "--config", str(config)],
        env={**env, **cpu, "RANK": "1"},
        stdout=open(logs[1], "wb"),
        stderr=subprocess.STDOUT,
    )
    procs = (driver, follower_proc)

    def tails() -> str:
        return "\n".join(f"--- rank {r}\n{p.read_text()[-3000:]}" for r, p in logs.items())

    try:
        deadline = time.monotonic() + 180
        code, body = _get(health_port)
        while code != 200 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.2)
            code, body = _get(health_port)
        assert code == 200, f"/healthz answered {code} {body}\n{tails()}"
        assert body["rank"] == 1 and body["role"] == "follower" and body["run"] == "follower", body
        deadline = time.monotonic() + 120
        while "loss" not in logs[0].read_text() and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.2)
        assert "loss" in logs[0].read_text(), tails()  # the follower took part in a real step
        assert _get(health_port)[0] == 200
        stop.touch()
        assert follower_proc.wait(timeout=60) == 0, tails()
        assert driver.wait(timeout=60) == 0, tails()
        assert _get(health_port)[0] == 0, "the health server outlived the follower"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
