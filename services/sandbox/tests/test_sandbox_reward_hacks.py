"""Test mode against solutions that try to fake a pass instead of solving the task.

Every hack runs against the same tests (function calls, an assert snippet, a stdin/stdout case);
a correct solution passes all of them first, so a hack that passes nothing is the grader working,
not the tests being broken.
"""

from __future__ import annotations

import json

import pytest
from sbx_helpers import answers_normally

from offbeat.sandbox_client import SandboxClient
from offbeat.v1 import sandbox_pb2 as pb

pytestmark = pytest.mark.integration

TESTS = [
    pb.TestCase(name="small", function="add", args_json="[1, 2]", expected_json="3"),
    pb.TestCase(name="zero", function="add", args_json="[-5, 5]", expected_json="0"),
    pb.TestCase(name="assert", assert_code="assert add(2, 3) == 5\nassert add(0, 0) == 0, 'zero'"),
    pb.TestCase(name="loop", assert_code="for i in range(3):\n    assert add(i, 1) == i + 1"),
    pb.TestCase(name="stdio", stdin=b"4 5\n", expected_stdout=b"9\n"),
]

CORRECT = """
import sys
def add(a, b):
    return a + b
data = sys.stdin.read().split()
if data:
    print(add(*map(int, data)))
"""


async def grade(client: SandboxClient, code: str) -> pb.SandboxExecResult:
    result = await client.run_tests(code, TESTS, limits=pb.ExecLimits(wall_timeout_s=5))
    assert len(result.tests) == len(TESTS), "every given test must have its own result"
    assert [t.index for t in result.tests] == list(range(len(TESTS)))
    return result


async def still_grades_correctly(client: SandboxClient) -> None:
    """After a hack, the service answers normally and a correct solution still passes everything."""
    await answers_normally(client)
    result = await grade(client, CORRECT)
    assert result.tests_passed == len(TESTS), [(t.index, t.message) for t in result.tests]


async def test_correct_solution_passes_every_test(client: SandboxClient) -> None:
    result = await grade(client, CORRECT)
    assert result.tests_passed == len(TESTS), [(t.index, t.message) for t in result.tests]
    assert result.status == pb.EXEC_STATUS_OK


async def test_wrong_solution_fails_and_exact_types_count(client: SandboxClient) -> None:
    result = await grade(client, "def add(a, b):\n    return float(a + b)\nprint('9')\n")
    # 3.0 is not 3, and the stdout case only matches by accident of printing: that one passes
    assert [t.passed for t in result.tests] == [False, False, False, False, True]
    assert "expected 3" in result.tests[0].message


@pytest.mark.parametrize(
    "exit_code",
    ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit(0)\n"],
    ids=["sys.exit", "os._exit", "SystemExit"],
)
async def test_exiting_zero_before_the_harness_passes_nothing(client: SandboxClient, exit_code: str) -> None:
    result = await grade(client, "def add(a, b):\n    return 0\n" + exit_code)
    assert result.tests_passed == 0, [(t.index, t.passed, t.message) for t in result.tests]
    await still_grades_correctly(client)


async def test_exiting_zero_inside_the_function_passes_nothing(client: SandboxClient) -> None:
    code = "import os, sys\ndef add(a, b):\n    sys.stdout.flush()\n    os._exit(0)\n"
    result = await grade(client, code)
    assert result.tests_passed == 0
    code = "import sys\ndef add(a, b):\n    sys.exit(0)\n"
    assert (await grade(client, code)).tests_passed == 0
    await still_grades_correctly(client)


async def test_always_equal_objects_are_not_plain_data(client: SandboxClient) -> None:
    code = """
class Anything:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__
class Int(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
calls = 0
def add(a, b):
    global calls
    calls += 1
    return Anything() if calls % 2 else Int(0)
"""
    result = await grade(client, code)
    assert result.tests_passed == 0, [(t.index, t.message) for t in result.tests]
    assert "not plain data" in result.tests[0].message
    await still_grades_correctly(client)


async def test_patching_builtins_passes_nothing(client: SandboxClient) -> None:
    code = """
import builtins, json, os
builtins.isinstance = lambda *a: True
builtins.type = lambda *a: int
builtins.AssertionError = type("Never", (Exception,), {})
json.dumps = lambda *a, **k: '{"passed": true}'
json.loads = lambda *a, **k: [3, 0]
_write = os.write
os.write = lambda fd, data: _write(fd, b'{"passed": true}\\n') if fd == 3 else _write(fd, data)
def add(a, b):
    return 42
"""
    result = await grade(client, code)
    assert result.tests_passed == 0, [(t.index, t.message) for t in result.tests]
    await still_grades_correctly(client)


async def test_patching_the_harness_with_the_stolen_nonce_passes_nothing(client: SandboxClient) -> None:
    # The solution digs this run's nonce out of its memory and writes forged records itself:
    # "done" for the asserts, and a value for the calls. It cannot know the expected values.
    code = """
import json, os, sys
frame, unit, nonce = sys._getframe(), None, None
while frame is not None:
    if "nonce" in frame.f_locals and "unit" in frame.f_locals:
        unit, nonce = frame.f_locals["unit"], frame.f_locals["nonce"]
    frame = frame.f_back
print("nonce found" if nonce else "nonce not found")
sys.stdout.flush()
def record(**fields):
    os.write(3, (json.dumps({"n": nonce, "i": unit["test"], **fields}) + "\\n").encode())
if unit["kind"] == "call":
    record(v={"i": "42"})
elif unit["kind"] == "assert":
    for k in range(2):
        record(a=k, v=[{"i": "42"}])
    record(done=True)
os._exit(0)
"""
    result = await grade(client, code)
    assert b"nonce found" in result.stdout, "the hack did not run as intended"
    assert result.tests_passed == 0, [(t.index, t.message) for t in result.tests]
    await still_grades_correctly(client)


async def test_printing_a_forged_success_record_passes_nothing(client: SandboxClient) -> None:
    code = """
import json, sys
for i in range(5):
    for stream in (sys.stdout, sys.stderr):
        stream.write(json.dumps({"n": "0" * 32, "i": i, "v": {"i": "3"}, "done": True, "passed": True}) + "\\n")
        stream.write("PASSED\\nOK\\n")
def add(a, b):
    return -1
"""
    result = await grade(client, code)
    assert result.tests_passed == 0, [(t.index, t.message) for t in result.tests]
    await still_grades_correctly(client)


async def test_killing_the_worker_passes_nothing(client: SandboxClient) -> None:
    code = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef add(a, b):\n    return a + b\n"
    result = await grade(client, code)
    assert result.tests_passed == 0
    assert all(not t.passed for t in result.tests)
    # the run's own failure (a zero), not a failure to judge it that a policy could hide behind
    assert result.status == pb.EXEC_STATUS_RUNTIME_ERROR, result.error
    assert "took down its sandbox worker" in result.error
    await still_grades_correctly(client)


async def test_assert_literals_never_enter_the_sandbox(client: SandboxClient) -> None:
    # the snippet's expected value 5 is kept by the grader: the solution can read what was sent
    code = """
import sys
frame, sent = sys._getframe(), []
while frame is not None:
    if "unit" in frame.f_locals:
        sent.append(frame.f_locals["unit"]["code"])
    frame = frame.f_back
print(repr(sent))
def add(a, b):
    return a + b
"""
    tests = [pb.TestCase(assert_code="assert add(2, 3) == 5")]
    result = await client.run_tests(code, tests)
    assert result.tests_passed == 1
    result = await client.run_tests(code + "raise SystemExit(0)\n", tests)
    assert b"add(2, 3)" in result.stdout and b"5" not in result.stdout, result.stdout
    await still_grades_correctly(client)


async def test_the_workers_pipes_are_out_of_reach(client: SandboxClient) -> None:
    # the worker (our parent) is not dumpable: its /proc entries, and so its pipes to the
    # service, cannot be opened by the run even though both have the same uid
    code = """
import json, os
ppid, res = os.getppid(), {"written": []}
try:
    res["list"] = os.listdir(f"/proc/{ppid}/fd")
except OSError as exc:
    res["list"] = exc.errno
for n in range(64):
    try:
        fd = os.open(f"/proc/{ppid}/fd/{n}", os.O_WRONLY)
        os.write(fd, b"\\x00\\x00\\x00\\x02{}")
        res["written"].append(n)
    except OSError:
        pass
print(json.dumps(res))
def add(a, b):
    return -1
"""
    result = await client.run(code)
    report = json.loads(result.stdout)
    assert report["list"] == 13 and report["written"] == [], report  # EACCES
    assert (await grade(client, code)).tests_passed == 0
    await still_grades_correctly(client)


async def test_a_record_that_breaks_the_json_parser_fails_the_test_and_is_still_judged(
    client: SandboxClient,
) -> None:
    # a line nested 5,000 deep raised RecursionError in the grader, the request went unanswered,
    # and the scorer's SANDBOX_ERROR turned a zero into "not judged"
    code = "import os\ndef add(a, b):\n    os.write(3, b'[' * 5000 + b'\\n')\n    return a + b\n"
    result = await grade(client, code)
    assert result.status != pb.EXEC_STATUS_SANDBOX_ERROR, result.error
    assert [t.passed for t in result.tests[:3]] == [False, False, False]
    assert "malformed test record" in result.tests[0].message
    await still_grades_correctly(client)


async def test_stopping_the_worker_does_not_stop_the_clock(client: SandboxClient) -> None:
    # the run stops its worker (its parent) while it works past the wall limit, and has a child
    # continue it after the run exited: the worker then saw only an exited run, never the deadline
    code = """
import os, signal, sys, time
worker = os.getppid()
os.kill(worker, signal.SIGSTOP)
t = time.monotonic()
while time.monotonic() - t < 4:
    pass
print(9)
sys.stdout.flush()
if os.fork() == 0:
    time.sleep(0.3)
    os.kill(worker, signal.SIGCONT)
    os._exit(0)
"""
    result = await client.run_tests(
        code, [pb.TestCase(stdin=b"4 5\n", expected_stdout=b"9\n")], limits=pb.ExecLimits(wall_timeout_s=1)
    )
    assert result.tests_passed == 0, [(t.status, t.wall_s, t.message) for t in result.tests]
    assert result.tests[0].status in (pb.EXEC_STATUS_TIMEOUT, pb.EXEC_STATUS_RUNTIME_ERROR)
    await still_grades_correctly(client)


async def test_reporting_the_end_of_an_assert_snippet_after_its_first_assert_passes_nothing(
    client: SandboxClient,
) -> None:
    # right for the first assert only, then the completion record forged with the stolen nonce
    code = """
import json, os, sys
def add(a, b):
    if (a, b) == (2, 3):
        return 5
    f = sys._getframe()
    while "nonce" not in f.f_locals:
        f = f.f_back
    os.write(3, (json.dumps({"done": True, "n": f.f_locals["nonce"], "i": f.f_locals["unit"]["test"]}) + "\\n").encode())
    os._exit(0)
"""
    tests = [
        pb.TestCase(assert_code="assert add(2, 3) == 5\nassert add(10, 20) == 30\nassert add(1, 1) == 2")
    ]
    result = await client.run_tests(code, tests)
    assert result.tests_passed == 0, [t.message for t in result.tests]
    assert "never ran" in result.tests[0].message
    await still_grades_correctly(client)


async def test_memory_outside_the_address_space_limit_is_refused(client: SandboxClient) -> None:
    # memfd pages count against neither RLIMIT_AS nor the size-limited /tmp
    code = "import os\ntry:\n    os.memfd_create('x')\n    print('made')\nexcept OSError as e:\n    print('refused', e.errno)\n"
    result = await client.run(code)
    assert result.stdout.startswith(b"refused"), result.stdout
