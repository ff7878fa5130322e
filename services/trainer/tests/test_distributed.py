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
