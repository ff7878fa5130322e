"""A service whose configuration cannot work exits with EX_CONFIG (78) and one line naming the
setting, before it connects to anything: the launcher stops the run at once instead of restarting a
service that can never start (no servers are running in these tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from offbeat.config import EX_CONFIG

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("service", "sets", "message"),
    [
        ("inference", [], "offbeat-inference: [model] path is empty"),
        (
            "inference",
            ["model.path=/nowhere/model"],
            "offbeat-inference: [model] path '/nowhere/model' is not a directory",
        ),
        ("scorer", [], "offbeat-scorer: [model] path is empty"),
        (
            "scorer",
            ["scorer.tokenizer_path=./no-such-tokenizer"],
            "scorer.tokenizer_path './no-such-tokenizer' is not a directory",
        ),
        (
            "orchestrator",
            ['envs=[{name = "no_such_env"}]'],
            "offbeat-orchestrator: envs: no environment 'no_such_env'",
        ),
        ("orchestrator", ['envs=[{name = "reasoning_gym:no_such_task"}]'], "offbeat-orchestrator: envs: "),
        (
            "orchestrator",
            ["orchestrator.admin_token_file=/nowhere/token"],
            "offbeat-orchestrator: orchestrator.admin_token_file: admin token file '/nowhere/token' does not exist",
        ),
    ],
)
def test_a_config_that_cannot_work_exits_78_with_the_setting_named(
    service_config_file, service, sets, message
):  # type: ignore[no-untyped-def]
    args = [
        str(BIN / f"offbeat-{service}"),
        "--config",
        str(service_config_file),
        "--nats-url",
        "nats://127.0.0.1:1",
    ]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EX_CONFIG, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
