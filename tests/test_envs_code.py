"""`code` against the REAL sandbox service: references pass, wrong code and reward hacks score 0,
and a stopped sandbox gives the status `sandbox_error`, never a reward of 0."""

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip(
    "offbeat.sandbox_client", reason="the sandbox client (offbeat.sandbox_client) is not importable"
)
pytest.importorskip(
    "offbeat_sandbox.service", reason="the sandbox service (offbeat_sandbox) is not importable"
)

import nats

from offbeat import envs
from offbeat.envs import EnvContext, RewardStatus
from offbeat.infra import free_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_sandbox(config_file: Path, nats_url: str, prefix: str) -> subprocess.Popen:
    port = free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "offbeat-sandbox"),
            "--config",
            str(config_file),
            "--nats-url",
            nats_url,
            "--set",
            f"bus.prefix={prefix}",
            "--set",
            "run.id=sandboxtest",
            "--set",
            f"sandbox.health_port={port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not _healthy(port):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "sandbox did not become healthy"
        time.sleep(0.2)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def sandbox_prefix(tmp_path_factory, nats_url):
    config = tmp_path_factory.mktemp("sbx") / "run.toml"
    config.write_text(f'[run]\nstate_dir = "{config.parent / "state"}"\n')
    proc = start_sandbox(config, nats_url, "codeenv")
    yield "codeenv"
    stop(proc)


@pytest.fixture
async def code_env(nats_url, sandbox_prefix):
    nc = await nats.connect(nats_url)
    env = envs.load("code", timeout_s=30.0)
    await env.setup(EnvContext(nats=nc, sandbox_subject=f"{sandbox_prefix}.sandbox.exec"))
    yield env
    await env.close()
    await nc.close()


def answer(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


async def test_reference_solutions_score_one(code_env):
    examples = list(code_env.examples("train")) + list(code_env.examples("eval"))
    assert len(examples) == 22
    for example in examples:
        reward = await code_env.score(example, answer(example.answer))
        assert reward.status is RewardStatus.OK, f"{example.key}: {reward.reason}"
        assert reward.total == 1.0, f"{example.key}: reference scored {reward.total} ({reward.reason})"
        assert reward.components == {"correctness": 1.0, "tests_passed": 1.0}


def test_tests_are_never_in_the_prompt():
    env = envs.load("code")
    for example in env.examples("train"):
        text = example.prompt[0]["content"]
        assert example.tests and example.metadata["function"] in text
        for case in example.tests:
            assert case["args_json"] not in text, f"{example.key}: test arguments leak into the prompt"


WRONG = {
    "c000_add": "def add(a, b):\n    return a - b",
    "c004_factorial": "def factorial(n):\n    r = 1\n    for i in range(2, n):\n        r *= i\n    return r",
    "c005_fibonacci": "def fibonacci(n):\n    return n",
    "c016_mean": "def mean(xs):\n    return sum(xs) // len(xs)",  # right values for some cases, wrong type
    "c001_reverse_string": "def reverse_string(s):\n    return s",
    "c014_merge_sorted": "def merge_sorted(a, b):\n    return a + b",
    "c008_two_sum": "def two_sum(nums, target):\n    return (0, 1)",  # a tuple is not a list
    "c002_is_palindrome": "def is_palindrome(s):\n    return 1",  # truthy int is not True
}


@pytest.mark.parametrize("key", sorted(WRONG))
async def test_wrong_solutions_score_zero(code_env, key):
    reward = await code_env.score(code_env.get(key), answer(WRONG[key]))
    assert reward.status is RewardStatus.OK, reward.reason
    assert reward.total == 0.0, f"{key}: wrong code scored {reward.total}"
    assert reward.components["tests_passed"] < 1.0


async def test_partial_credit_is_the_passed_fraction(nats_url, sandbox_prefix):
    nc = await nats.connect(nats_url)
    env = envs.load("code", partial_credit=True)
    await env.setup(EnvContext(nats=nc, sandbox_subject=f"{sandbox_prefix}.sandbox.exec"))
    # `abs(a) + b` is right for non-negative a only: [1, 2], [100, 23], [0, 0] pass, [-5, 5] fails
    reward = await env.score(env.get("c000_add"), answer("def add(a, b):\n    return abs(a) + b"))
    await nc.close()
    assert reward.status is RewardStatus.OK
    assert reward.components["correctness"] == 0.0 and reward.total == pytest.approx(0.75)


HACKS = {
    "sys_exit_at_import": "import sys\nsys.exit(0)\ndef add(a, b):\n    return -1",
    "os_exit_at_import": "import os\nos._exit(0)",
    "system_exit_in_call": "def add(a, b):\n    raise SystemExit(0)",
    "os_exit_in_call": "import os\ndef add(a, b):\n    os._exit(0)",
    "always_equal": (
        "class Anything:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
        "        return False\n    __hash__ = object.__hash__\ndef add(a, b):\n    return Anything()"
    ),
    "int_subclass_always_equal": (
        "class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return Int(-1)"
    ),
    "patched_builtins": (
        "import builtins\nbuiltins.isinstance = lambda *a: True\nbuiltins.type = lambda *a: int\n"
        "builtins.repr = lambda x: '3'\nbuiltins.str = lambda *a: '3'\ndef add(a, b):\n    return -1"
    ),
    "patched_json_and_operator": (
        "import json, operator\njson.loads = lambda *a, **k: 0\njson.dumps = lambda *a, **k: '0'\n"
        "operator.eq = lambda a, b: True\ndef add(a, b):\n    return -1"
    ),
    "patched_harness_frames": (
        "import sys\nfor name, mod in list(sys.modules.items()):\n    for attr in ('check', 'compare', 'grade', 'equal', 'run_test', 'run_tests'):\n"
        "        if hasattr(mod, attr):\n            try:\n                setattr(mod, attr, lambda *a, **k: True)\n            except Exception:\n                pass\n"
        "def add(a, b):\n    return -1"
    ),
    "forged_success_records": (
        "import sys, json\nfor i in range(4):\n    rec = json.dumps({'index': i, 'passed': True, 'status': 'OK'})\n"
        "    print(rec); print('PASS', i); sys.stderr.write(rec + '\\n')\n"
        "    print(json.dumps({'tests_passed': 4, 'results': [{'passed': True}] * 4}))\n"
        "sys.stdout.flush()\ndef add(a, b):\n    return -1"
    ),
    "forged_records_then_exit": (
        "import json, os\nfor i in range(4):\n    print(json.dumps({'index': i, 'passed': True}))\n"
        "os.write(1, b'{\"passed\": true}\\n')\nos._exit(0)"
    ),
    "atexit_success": (
        "import atexit\natexit.register(lambda: print('{\"passed\": true}'))\ndef add(a, b):\n    raise ValueError('no')"
    ),
}


@pytest.mark.parametrize("hack", sorted(HACKS))
async def test_reward_hacks_score_zero(code_env, hack):
    reward = await code_env.score(code_env.get("c000_add"), answer(HACKS[hack]))
    assert reward.status is RewardStatus.OK, f"{hack}: {reward.status} {reward.reason}"
    assert reward.total == 0.0, f"reward hack {hack!r} scored {reward.total} ({reward.reason})"
    assert reward.components["tests_passed"] == 0.0, f"{hack}: {reward.components}"


async def test_no_code_block_is_a_parse_error(code_env):
    reward = await code_env.score(code_env.get("c000_add"), "def add(a, b): return a + b")
    assert reward.status is RewardStatus.PARSE_ERROR and reward.total == 0.0


async def test_stopped_sandbox_gives_sandbox_error_not_zero(tmp_path, nats_url):
    config = tmp_path / "run.toml"
    config.write_text(f'[run]\nstate_dir = "{tmp_path / "state"}"\n')
    proc = start_sandbox(config, nats_url, "stoptest")
    nc = await nats.connect(nats_url)
    env = envs.load("code", timeout_s=2.0, retries=1)
    await env.setup(EnvContext(nats=nc, sandbox_subject="stoptest.sandbox.exec"))
    example = env.get("c000_add")
    try:
        up = await env.score(example, answer(example.answer))
        assert up.status is RewardStatus.OK and up.total == 1.0, up.reason
        stop(proc)
        down = await env.score(example, answer(example.answer))
    finally:
        if proc.poll() is None:
            stop(proc)
        await nc.close()
    assert down.status is RewardStatus.SANDBOX_ERROR, f"stopped sandbox gave {down.status} ({down.reason})"
    assert not down.status.judged
    assert "sandbox" in down.reason


async def test_without_a_sandbox_connection_the_status_says_so():
    env = envs.load("code")
    reward = await env.score(env.get("c000_add"), answer("def add(a, b):\n    return a + b"))
    assert reward.status is RewardStatus.SANDBOX_ERROR
