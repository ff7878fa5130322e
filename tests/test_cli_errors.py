"""The `offbeat` CLI turns a user's mistake into one line that says what to do, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

OFFBEAT = str(Path(sys.executable).parent / "offbeat")


def _offbeat(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OFFBEAT, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_env", "offbeat env show: no environment 'no_such_env'; known: math, code"),
        ("reasoning_gym:no_such_task", "offbeat env show: "),
    ],
)
def test_env_show_of_an_unknown_environment(name: str, message: str) -> None:
    out = _offbeat("env", "show", name)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_admin_with_a_missing_ca_file(tmp_path: Path) -> None:
    token = tmp_path / "admin.token"
    token.write_text("t\n")
    out = _offbeat("admin", "status", "--tls-ca", str(tmp_path / "ca.pem"), "--token-file", str(token))
    assert out.returncode == 2 and "--tls-ca" in out.stdout + out.stderr and "Traceback" not in out.stderr


def test_admin_with_no_orchestrator_says_where_it_looked(tmp_path: Path) -> None:
    token = tmp_path / "admin.token"
    token.write_text("t\n")
    out = _offbeat(
        "admin", "status", "--address", "127.0.0.1:1", "--token-file", str(token), "--timeout", "5"
    )
    assert out.returncode == 1
    assert "no orchestrator answered at 127.0.0.1:1" in out.stderr and "--run-dir" in out.stderr


def test_sandbox_exec_of_a_missing_program_or_with_no_server(tmp_path: Path) -> None:
    out = _offbeat("sandbox", "exec", str(tmp_path / "nope.py"))
    assert out.returncode == 2 and "nope.py: no such file" in out.stderr
    program = tmp_path / "p.py"
    program.write_text("print(1)\n")
    out = _offbeat("sandbox", "exec", str(program), "--nats-url", "nats://u:secret@127.0.0.1:1")
    assert out.returncode == 2 and "no NATS server at nats://u:***@127.0.0.1:1" in out.stderr
    assert "Traceback" not in out.stderr and "secret" not in out.stderr


EXAMPLE = str(Path(__file__).parents[1] / "examples" / "arithmetic.toml")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (['launcher.services=["trainr"]'], "launcher.services: unknown service 'trainr'"),
        (['envs=[{name = "arithmetic"}]'], "offbeat run: envs: no environment 'arithmetic'"),
        (["trainer.lrr=1"], "trainer.lrr: Extra inputs are not permitted"),
        (["trainer.weights_every=9"], "weights_every = 9 exceeds [run] max_staleness + 1"),
    ],
)
def test_run_refuses_a_service_section_before_it_starts_anything(
    tmp_path: Path, sets: list[str], message: str
) -> None:
    # these were found only when each service started: after the servers, the model and the SFT
    args = ["run", EXAMPLE, "--set", f"run.state_dir={tmp_path / 'state'}"]
    for s in sets:
        args += ["--set", s]
    out = _offbeat(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "state").exists(), "something was started before the refusal"


def test_run_check_validates_and_starts_nothing(tmp_path: Path) -> None:
    out = _offbeat("run", EXAMPLE, "--check", "--set", f"run.state_dir={tmp_path / 'state'}")
    assert out.returncode == 0 and "the configuration is valid" in out.stdout
    assert not (tmp_path / "state").exists()


def test_ledger_upgrade_of_an_unreachable_database() -> None:
    out = _offbeat("ledger", "upgrade", "--database-url", "postgresql://u:secret@127.0.0.1:1/x")
    assert out.returncode == 1 and "offbeat ledger upgrade: postgresql://u:***@127.0.0.1:1/x" in out.stderr
    assert "Traceback" not in out.stderr and "secret" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nowhere/model", "--data", __file__], "--model /nowhere/model: not a directory"),
        (["--model", ".", "--data", "/nowhere/pairs.jsonl"], "--data /nowhere/pairs.jsonl: no such file"),
    ],
)
def test_trainer_sft_with_a_missing_model_or_data_file(tmp_path: Path, args: list[str], message: str) -> None:
    trainer = str(Path(sys.executable).parent / "offbeat-trainer")
    out = subprocess.run(
        [trainer, "sft", *args, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
