"""torchrun with 2 gloo processes computes the same parameters as 1 process, after 3 steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_gloo_processes_match_one_process(tiny_model, tmp_path, parallel):  # type: ignore[no-untyped-def]
    common = ["--model", str(tiny_model), "--steps", "3", "--parallel", parallel]
    one = _run(
        [sys.executable, "-m", "offbeat_trainer.distributed", *common, "--out", str(tmp_path / "one.st")]
    )
    two = _run(
        [
            str(BIN / "torchrun"),
            "--nproc-per-node",
            "2",
            "--standalone",
            "-m",
            "offbeat_trainer.distributed",
            *common,
            "--out",
            str(tmp_path / "two.st"),
        ]
    )
    assert "world=1" in one and f"wrapper={parallel} world=2" in two, two
    a, b = load_file(str(tmp_path / "one.st")), load_file(str(tmp_path / "two.st"))
    base = load_file(str(tiny_model / "model.safetensors"))
    assert sorted(a) == sorted(b)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-5, f"1 vs 2 processes differ by {diff:.2e}"
    moved = max(float((a[k] - base[k]).abs().max()) for k in base)
    assert moved > 1e-4, "training did not move the parameters, so the comparison shows nothing"


@pytest.mark.integration
async def test_service_under_torchrun_matches_single_process_service(
    bus_config, nats_url, tiny_model, tmp_path, make_scored
):  # type: ignore[no-untyped-def]
    """The service itself with 2 gloo ranks (FSDP2) publishes the same weights as with 1 process."""
    import signal
    import uuid

    from offbeat.bus import Bus
    from offbeat.testing import wait_for

    results = {}
    for ranks in (1, 2):
        run_id = f"t{uuid.uuid4().hex[:10]}"
        state = tmp_path / f"state{ranks}"
        config = tmp_path / f"run{ranks}.toml"
        config.write_text(
            f'[run]\nid = "{run_id}"\nstate_dir = "{state}"\ngroup_size = 4\ngroups_per_step = 2\n'
            f'max_steps = 2\nmax_staleness = 100\n[model]\npath = "{tiny_model}"\n'
            f"[bus]\nstream_max_bytes = {256 * 1024 * 1024}\n"
            f"[trainer]\nlr = 1e-3\nmicro_batch_tokens = 64\n"
        )
        b = await Bus.connect(bus_config, run_id, name="test")
        await b.ensure()
        for g in range(4):
            for k in range(4):
                m = make_scored(
                    run_id,
                    f"g{g}-{k}",
                    f"g{g}",
                    group_size=4,
                    reward=float((g + k) % 3),
                    completion_len=3 + 2 * k,
                    seed=g,
                )
                await b.publish(b.subjects.rollout_scored, m, msg_id=f"scored:g{g}-{k}")
        cmd = [str(BIN / "offbeat-trainer"), "--config", str(config), "--nats-url", nats_url]
        if ranks == 2:
            cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", *cmd]
        log = tmp_path / f"trainer{ranks}.log"
        proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        try:

            async def two_versions(b: Bus = b) -> bool:
                head = await b.get_head()
                return head is not None and head.version == 2

            await wait_for(two_versions, timeout_s=240, interval_s=0.5)
            await wait_for(lambda p=proc: p.poll() is not None, timeout_s=60)  # max_steps reached
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
            await b.delete_streams()
            await b.close()
        assert proc.returncode == 0, log.read_text()[-3000:]
        want = '"wrapper": "fsdp", "world": 2' if ranks == 2 else '"wrapper": "none", "world": 1'
        assert want in log.read_text(), log.read_text()[-3000:]
        results[ranks] = load_file(str(state / "weights" / run_id / "v000002" / "model.safetensors"))
    a, b2 = results[1], results[2]
    diff = max(float((a[k] - b2[k]).abs().max()) for k in a)
    assert diff <= 1e-5, f"service with 2 ranks differs from 1 rank by {diff:.2e}"
