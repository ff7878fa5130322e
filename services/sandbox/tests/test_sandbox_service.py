"""The service around the sandbox: runs, limits, queue bound, replicas, metrics, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from offbeat_sandbox.config import SandboxConfig
from offbeat_sandbox.service import Sandbox
from sbx_helpers import SUBJECT, RunningService, answers_normally

from offbeat.sandbox_client import SandboxClient, SandboxUnavailable
from offbeat.v1 import sandbox_pb2 as pb

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


async def test_python_run_with_stdin_args_and_files(client: SandboxClient) -> None:
    code = "import sys\nfrom helper import twice\nprint(twice(sys.stdin.read().strip()), sys.argv[1:], open('data/x.txt').read())\nsys.exit(3)\n"
    files = {"helper.py": b"def twice(s):\n    return s * 2\n", "data/x.txt": b"payload"}
    result = await client.run(code, stdin=b"ab\n", args=["-v", "two words"], files=files)
    assert result.status == pb.EXEC_STATUS_RUNTIME_ERROR  # exit 3 is not OK, and is reported as is
    assert result.exit_code == 3
    assert result.stdout == b"abab ['-v', 'two words'] payload\n"
    assert result.wall_s > 0 and result.cpu_s > 0 and result.peak_memory_bytes > 0


async def test_large_stdin_and_output(client: SandboxClient) -> None:
    data = bytes(range(256)) * 12_000  # 3 MB: far over a pipe's buffer both ways
    code = "import sys\nd = sys.stdin.buffer.read()\nsys.stdout.buffer.write(d[::-1])\n"
    result = await client.run(code, stdin=data, limits=pb.ExecLimits(output_bytes=4 * 1024**2))
    assert result.status == pb.EXEC_STATUS_OK, result.stderr
    assert result.stdout == data[::-1] and not result.stdout_truncated


async def test_the_user_is_known_by_name(client: SandboxClient) -> None:
    result = await client.run("import getpass, os\nprint(getpass.getuser(), os.path.expanduser('~'))")
    assert result.stdout == b"nobody /tmp/w\n", result.stderr
    result = await client.run("whoami; id -gn", language="bash")
    assert result.stdout == b"nobody\nnogroup\n", result.stderr


async def test_bash_run(client: SandboxClient) -> None:
    result = await client.run(
        'read x; echo "got $x $1"; echo err >&2; exit 0', language="bash", stdin=b"in\n", args=["a1"]
    )
    assert result.status == pb.EXEC_STATUS_OK, result
    assert result.stdout == b"got in a1\n" and result.stderr == b"err\n"


async def test_bash_stdio_tests_and_python_only_tests(client: SandboxClient) -> None:
    request = pb.SandboxExecRequest(
        language=pb.LANGUAGE_BASH,
        code="read a b; echo $((a + b))",
        tests=[
            pb.TestCase(stdin=b"1 2\n", expected_stdout=b"3"),
            pb.TestCase(stdin=b"1 2\n", expected_stdout=b"4"),
            pb.TestCase(function="add", args_json="[1, 2]", expected_json="3"),
        ],
    )
    result = await client.execute(request)
    assert [t.passed for t in result.tests] == [True, False, False]
    assert result.tests_passed == 1
    assert "need python" in result.tests[2].message


async def test_runtime_error_and_syntax_error(client: SandboxClient) -> None:
    result = await client.run("def f(:\n")
    assert result.status == pb.EXEC_STATUS_RUNTIME_ERROR and b"SyntaxError" in result.stderr
    result = await client.run("raise ValueError('boom')")
    assert result.status == pb.EXEC_STATUS_RUNTIME_ERROR
    assert b'File "/tmp/w/main.py", line 1' in result.stderr and b"ValueError: boom" in result.stderr


async def test_invalid_requests_are_answered_with_the_reason(client: SandboxClient) -> None:
    result = await client.run("print(1)", files={"../escape": b"x"})
    assert result.status == pb.EXEC_STATUS_SANDBOX_ERROR and "plain relative path" in result.error
    result = await client.run_tests("x = 1", [pb.TestCase(function="f", args_json="{", expected_json="1")])
    assert result.status == pb.EXEC_STATUS_SANDBOX_ERROR
    assert len(result.tests) == 1 and not result.tests[0].passed
    reply = await client.nc.request(SUBJECT, b"\xff\xff not a protobuf", timeout=10)
    assert pb.SandboxExecResult.FromString(reply.data).status == pb.EXEC_STATUS_SANDBOX_ERROR
    await answers_normally(client)


async def test_concurrent_requests_all_answered(client: SandboxClient) -> None:
    results = await asyncio.gather(*(client.run(f"print({i} * 2)") for i in range(40)))
    assert [r.stdout for r in results] == [f"{i * 2}\n".encode() for i in range(40)]


async def test_metrics_count_runs_by_status_and_occupancy(
    client: SandboxClient, sandbox_service: RunningService
) -> None:
    await client.run("import sys; sys.exit(1)")
    text = sandbox_service.metrics()
    assert 'offbeat_sandbox_runs_total{status="OK"}' in text
    assert 'offbeat_sandbox_runs_total{status="RUNTIME_ERROR"}' in text
    assert "offbeat_sandbox_request_seconds_bucket" in text
    for gauge in ("offbeat_sandbox_pool_busy", "offbeat_sandbox_pool_idle", "offbeat_sandbox_pool_waiting"):
        assert gauge in text


async def test_cli_exec_prints_the_result_as_json(
    client: SandboxClient, nats_url: str, tmp_path: Path
) -> None:
    prog = tmp_path / "prog.py"
    prog.write_text("import sys\nprint(sys.stdin.read().upper())\n")
    stdin = tmp_path / "in.txt"
    stdin.write_text("hello")
    args = [str(BIN / "offbeat"), "sandbox", "exec", "--lang", "python", str(prog), "--stdin", str(stdin)]
    args += ["--timeout-s", "5", "--memory-mb", "256", "--nats-url", nats_url, "--subject", SUBJECT]
    out = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["status"] == "OK" and data["stdout"] == "HELLO\n"
    script = tmp_path / "loop.sh"
    script.write_text("while true; do :; done\n")
    args = [str(BIN / "offbeat"), "sandbox", "exec", "--lang", "bash", str(script), "--timeout-s", "1"]
    args += ["--nats-url", nats_url, "--subject", SUBJECT]
    out = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and json.loads(out.stdout)["status"] == "TIMEOUT"


async def test_client_raises_when_no_sandbox_answers(client: SandboxClient) -> None:
    lonely = SandboxClient(client.nc, subject="nobody.sandbox.exec", timeout_s=1.0, retries=1)
    with pytest.raises(SandboxUnavailable):
        await lonely.run("print(1)")


async def test_bounded_queue_answers_overloaded_at_once() -> None:
    uid_base = 63000 + (os.getpid() % 400) * 8
    sandbox = Sandbox(SandboxConfig(workers=1, max_queue=1, uid_base=uid_base))
    await sandbox.start()
    try:
        slow = pb.SandboxExecRequest(
            code="import time\ntime.sleep(3)", limits=pb.ExecLimits(wall_timeout_s=10)
        )
        running = asyncio.create_task(sandbox.execute(slow))
        await asyncio.sleep(0.5)
        waiting = asyncio.create_task(sandbox.execute(pb.SandboxExecRequest(code="print(1)")))
        await asyncio.sleep(0.2)
        refused = await sandbox.execute(pb.SandboxExecRequest(code="print(2)"))
        assert refused.status == pb.EXEC_STATUS_OVERLOADED, refused
        assert not running.done(), "the refusal had to wait for the running request"
        assert (await running).status == pb.EXEC_STATUS_OK
        assert (await waiting).stdout == b"1\n"
    finally:
        await sandbox.close()


async def test_a_request_waits_for_a_worker_at_most_max_queue_wait() -> None:
    uid_base = 63200 + (os.getpid() % 400) * 8
    sandbox = Sandbox(SandboxConfig(workers=1, max_queue=10, max_queue_wait_s=0.5, uid_base=uid_base))
    await sandbox.start()
    try:
        slow = pb.SandboxExecRequest(
            code="import time\ntime.sleep(4)", limits=pb.ExecLimits(wall_timeout_s=10)
        )
        running = asyncio.create_task(sandbox.execute(slow))
        await asyncio.sleep(0.5)
        late = await sandbox.execute(pb.SandboxExecRequest(code="print(1)"))
        assert late.status == pb.EXEC_STATUS_OVERLOADED and "busy" in late.error, late
        assert not running.done(), "the refusal came only once the worker was free"
        assert (await running).status == pb.EXEC_STATUS_OK
        assert (await sandbox.execute(pb.SandboxExecRequest(code="print(1)"))).stdout == b"1\n"
    finally:
        await sandbox.close()


async def test_replicas_share_the_queue_group(
    client: SandboxClient, sandbox_service: RunningService, nats_url: str, tmp_path: Path
) -> None:
    """A second replica on the same subject and host takes part of the load without disturbing the first."""
    from offbeat.infra import free_port

    port = free_port()
    uid_base = sandbox_service.uid_base  # the same: the replica must claim the next free block of uids
    args = [
        str(BIN / "offbeat-sandbox"),
        "--config",
        str(sandbox_service.config_path),
        "--nats-url",
        nats_url,
    ]
    args += [
        "--set",
        f"sandbox.health_port={port}",
        "--set",
        "sandbox.workers=1",
        "--set",
        f"sandbox.uid_base={uid_base}",
    ]
    log = (tmp_path / "replica.log").open("wb")
    replica = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        import urllib.request

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        for _ in range(600):
            if healthy() or replica.poll() is not None:
                break
            await asyncio.sleep(0.1)
        assert healthy(), (tmp_path / "replica.log").read_text()[-3000:]
        results = await asyncio.gather(
            *(client.run("import time; time.sleep(0.05); print(7)") for _ in range(30))
        )
        assert all(r.stdout == b"7\n" for r in results)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        served = [
            line for line in text.splitlines() if line.startswith('offbeat_sandbox_runs_total{status="OK"}')
        ]
        assert served and float(served[0].split()[-1]) > 0, "the second replica served nothing"
    finally:
        replica.terminate()
        replica.wait(timeout=30)
        log.close()
    await answers_normally(client)


async def test_bash_pipelines_behave_as_in_a_fresh_shell(client: SandboxClient) -> None:
    result = await client.run("yes | head -n 3; echo done", language="bash")
    assert result.stdout == b"y\ny\ny\ndone\n" and result.stderr == b"", result.stderr


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_no_sandbox_outlives_its_service(nats_url: str, tmp_path: Path, how: str) -> None:
    """Stopped or killed (no clean-up code runs), the service takes every worker process with it."""
    import json as _json
    import signal
    import urllib.request

    import nats
    from offbeat_sandbox.isolation import processes_of_uid

    from offbeat.infra import free_port
    from offbeat.testing import wait_for

    config = tmp_path / "run.toml"
    config.write_text(
        f'[run]\nid = "sbxstop"\nstate_dir = "{tmp_path / "state"}"\n[bus]\nprefix = "sbxstop"\n'
    )
    port = free_port()
    log_path = tmp_path / "service.log"
    args = [str(BIN / "offbeat-sandbox"), "--config", str(config), "--nats-url", nats_url]
    args += ["--set", f"sandbox.health_port={port}", "--set", "sandbox.workers=2"]
    args += ["--set", f"sandbox.uid_base={63800 + (os.getpid() % 100) * 8}"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                await asyncio.sleep(0.1)
        ready = [_json.loads(x) for x in log_path.read_text().splitlines() if '"sandbox pool ready"' in x]
        first, last = (int(u) for u in ready[-1]["uids"].split("-"))
        uids = range(first, last + 1)
        assert all(processes_of_uid(uid) for uid in uids), "the workers were not running"
        nc = await nats.connect(nats_url)
        client = SandboxClient(nc, subject="sbxstop.sandbox.exec", timeout_s=30)
        sleeper = asyncio.create_task(
            client.run("import time\ntime.sleep(60)", limits=pb.ExecLimits(wall_timeout_s=60))
        )
        await asyncio.sleep(1.0)  # the sleeper is in a worker now
        proc.send_signal(getattr(signal, how))
        await asyncio.to_thread(proc.wait, 30)
        sleeper.cancel()
        await nc.close()
        try:
            await wait_for(lambda: not any(processes_of_uid(uid) for uid in uids), timeout_s=10)
        except AssertionError:
            left = {uid: processes_of_uid(uid) for uid in uids}
            raise AssertionError(f"sandbox processes outlived the service ({how}): {left}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_output_before_a_timeout_is_kept(client: SandboxClient) -> None:
    code = (
        "import sys, time\nprint('before', flush=True)\nsys.stderr.write('err before\\n')\ntime.sleep(60)\n"
    )
    result = await client.run(code, limits=pb.ExecLimits(wall_timeout_s=1))
    assert result.status == pb.EXEC_STATUS_TIMEOUT
    assert result.stdout == b"before\n" and result.stderr == b"err before\n"
