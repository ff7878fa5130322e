"""Hostile programs against the real service: one property per test.

Each test asserts that the attack is contained and that the service then answers the next request
normally. No timing is asserted except generous bounds where the property is about killing.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from offbeat_sandbox.isolation import ETC_FILES, processes_of_uid
from sbx_helpers import SECRET, RunningService, answers_normally

from offbeat.infra import NatsServer, PostgresServer
from offbeat.sandbox_client import SandboxClient
from offbeat.v1 import sandbox_pb2 as pb

pytestmark = pytest.mark.integration


def lim(**kw: float) -> pb.ExecLimits:
    return pb.ExecLimits(**kw)  # type: ignore[arg-type]


def out_json(result: pb.SandboxExecResult) -> dict:
    assert result.status == pb.EXEC_STATUS_OK, (result.status, result.stderr[-2000:])
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


def sandbox_processes(service: RunningService) -> list[int]:
    return [pid for uid in service.worker_uids() for pid in processes_of_uid(uid)]


async def test_infinite_loop_is_killed_on_wall_clock(client: SandboxClient) -> None:
    started = time.monotonic()
    result = await client.run("while True:\n    pass\n", limits=lim(wall_timeout_s=1.0, cpu_time_s=30))
    assert result.status == pb.EXEC_STATUS_TIMEOUT, result
    assert result.signal == 9
    assert time.monotonic() - started < 15, "a busy loop was not killed near its 1 s wall-clock limit"
    await answers_normally(client)


async def test_cpu_limit_kills_a_busy_loop(client: SandboxClient) -> None:
    result = await client.run("while True:\n    pass\n", limits=lim(wall_timeout_s=30.0, cpu_time_s=1))
    assert result.status == pb.EXEC_STATUS_TIMEOUT, result
    assert result.signal in (9, 24), result  # SIGXCPU at the soft limit, SIGKILL at the hard one
    assert result.wall_s < 25, "killed by the wall clock, not by the CPU limit"
    await answers_normally(client)


async def test_sleep_forever_is_killed_on_wall_clock(client: SandboxClient) -> None:
    started = time.monotonic()
    result = await client.run("import time\ntime.sleep(10**6)\n", limits=lim(wall_timeout_s=1.0))
    assert result.status == pb.EXEC_STATUS_TIMEOUT, result
    assert time.monotonic() - started < 15, "a sleeper was not killed near its 1 s wall-clock limit"
    await answers_normally(client)


async def test_fork_bomb_is_capped_by_the_process_limit(client: SandboxClient, sandbox_service) -> None:
    code = """
import os, time, json
made = 0
for _ in range(10000):
    try:
        pid = os.fork()
    except OSError as exc:
        print(json.dumps({"made": made, "errno": exc.errno}))
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    made += 1
"""
    result = await client.run(code, limits=lim(max_processes=16, wall_timeout_s=5))
    report = out_json(result)
    assert report["made"] + 1 <= 16, f"{report['made']} children + the run itself under a limit of 16"
    assert report["errno"] == 11  # EAGAIN
    # the classic bomb: every process forks forever; it ends on the wall clock, nothing survives
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = await client.run(bomb, limits=lim(max_processes=32, wall_timeout_s=1))
    assert result.status == pb.EXEC_STATUS_TIMEOUT, result
    left = sandbox_processes(sandbox_service)
    assert len(left) <= 3 * sandbox_service.workers, f"fork bomb left processes: {left}"
    await answers_normally(client)


async def test_memory_bomb_gets_memory_limit(client: SandboxClient) -> None:
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))\n"
    result = await client.run(code, limits=lim(memory_bytes=256 * 1024**2))
    assert result.status == pb.EXEC_STATUS_MEMORY_LIMIT, (result.status, result.stderr[-500:])
    assert result.peak_memory_bytes <= 300 * 1024**2
    await answers_normally(client)


async def test_filling_tmp_stops_at_the_tmpfs_size_and_is_wiped(client: SandboxClient) -> None:
    code = """
import json, os
written = 0
err = None
for name in ("/tmp/w/fill", "/tmp/fill2", "/tmp/w/fill3"):
    try:
        with open(name, "wb") as fh:
            while True:
                fh.write(b"x" * (1 << 20))
                fh.flush()
                written += 1 << 20
    except OSError as exc:
        err = exc.errno
print(json.dumps({"written": written, "errno": err}))
"""
    result = await client.run(code, limits=lim(file_size_bytes=1024**3))
    report = out_json(result)
    assert report["errno"] == 28  # ENOSPC
    assert report["written"] <= 64 * 1024**2
    for _ in range(3):  # idle workers are taken in turn: these runs cover the one that filled tmp
        check = await client.run(
            "import os, json\nprint(json.dumps(sorted(os.listdir('/tmp')) + sorted(os.listdir('/tmp/w'))))"
        )
        assert json.loads(check.stdout) == ["w", "main.py"], "files of the previous run survived"
    await answers_normally(client)


async def test_file_size_limit(client: SandboxClient) -> None:
    code = "f = open('big', 'wb')\nf.write(b'x' * (8 << 20))\nf.close()\n"
    result = await client.run(code, limits=lim(file_size_bytes=1 << 20))
    assert result.status != pb.EXEC_STATUS_OK
    assert b"File too large" in result.stderr or result.signal == 25, result.stderr[-500:]  # EFBIG / SIGXFSZ
    await answers_normally(client)


async def test_writing_outside_tmp_fails_and_reaches_no_host_path(
    client: SandboxClient, tmp_path: Path
) -> None:
    marker = f"offbeat-escape-{os.getpid()}"
    targets = [
        f"/usr/{marker}",
        f"/usr/lib/{marker}",
        f"/{marker}",
        f"/etc/{marker}",
        f"/dev/{marker}",
        f"/proc/{marker}",
        f"/root/{marker}",
    ]
    host_twin = tmp_path / marker  # /tmp inside is the sandbox's own tmpfs: writable there, not here
    code = f"""
import json, os
res = {{}}
for t in {[*targets, str(host_twin)]!r}:
    try:
        os.makedirs(os.path.dirname(t), exist_ok=True)
        with open(t, "w") as fh:
            fh.write("x")
        res[t] = "written"
    except OSError as exc:
        res[t] = exc.errno
import subprocess
res["remount"] = subprocess.run(["mount", "-o", "remount,rw", "/usr"], capture_output=True).returncode
print(json.dumps(res))
"""
    report = out_json(await client.run(code))
    assert all(report[t] != "written" for t in targets), report
    assert report["remount"] != 0
    for t in [*targets, str(host_twin)]:
        assert not Path(t).exists(), f"{t} exists on the host"
    await answers_normally(client)


async def test_output_flood_is_capped(client: SandboxClient) -> None:
    code = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    result = await client.run(code, limits=lim(output_bytes=100_000))
    assert result.status == pb.EXEC_STATUS_OUTPUT_LIMIT, result.status
    assert result.stdout_truncated
    assert len(result.stdout) == 100_000
    result = await client.run(
        "import os\nwhile True:\n    os.write(2, b'e' * 65536)\n", limits=lim(output_bytes=50_000)
    )
    assert result.status == pb.EXEC_STATUS_OUTPUT_LIMIT and result.stderr_truncated
    assert len(result.stderr) == 50_000
    await answers_normally(client)


async def test_file_descriptor_exhaustion_is_capped(client: SandboxClient) -> None:
    code = """
import json, os
fds = []
try:
    while True:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as exc:
    print(json.dumps({"opened": len(fds), "errno": exc.errno}))
"""
    report = out_json(await client.run(code, limits=lim(max_open_files=32)))
    assert report["errno"] == 24  # EMFILE
    assert report["opened"] <= 32
    await answers_normally(client)


async def test_double_forked_daemon_does_not_outlive_the_result(
    client: SandboxClient, sandbox_service
) -> None:
    marker = f"daemon-{os.getpid()}-{time.time_ns()}"
    code = f"""
import os, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sh", ["/bin/sh", "-c", "trap '' TERM HUP; while true; do sleep 1; done; echo {marker}"])
    os._exit(0)
os.wait()
print("parent gone")
"""
    result = await client.run(code, limits=lim(wall_timeout_s=60))
    assert result.status == pb.EXEC_STATUS_OK and result.stdout == b"parent gone\n", result
    assert result.wall_s < 30, (
        "the service waited for the daemon (until the wall clock) instead of killing it"
    )
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    alive.append(int(entry.name))
            except OSError:
                continue
    assert not alive, f"daemon still alive after the result: {alive}"
    left = sandbox_processes(sandbox_service)
    assert len(left) <= 3 * sandbox_service.workers, f"processes left: {left}"
    await answers_normally(client)


async def test_network_is_unreachable(
    client: SandboxClient, nats_server: NatsServer, postgres_server: PostgresServer
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.1", 9))
            host_ip = probe.getsockname()[0]
        except OSError:
            host_ip = "10.0.0.1"
    targets = [
        ("127.0.0.1", nats_server.port),
        ("127.0.0.1", postgres_server.port),
        (host_ip, nats_server.port),
        ("1.1.1.1", 53),
        ("10.255.255.1", 80),
    ]
    code = f"""
import json, socket
res = []
for host, port in {targets!r}:
    try:
        s = socket.create_connection((host, port), timeout=2)
        res.append([host, port, "connected"])
    except OSError as exc:
        res.append([host, port, exc.errno])
try:
    socket.socket(socket.AF_INET6, socket.SOCK_STREAM).connect(("::1", {nats_server.port}))
    res.append(["::1", 0, "connected"])
except OSError as exc:
    res.append(["::1", 0, exc.errno])
print(json.dumps(res))
"""
    report = out_json(await client.run(code, limits=lim(wall_timeout_s=15)))
    assert len(report) == len(targets) + 1
    assert all(r[2] != "connected" for r in report), report
    # bash's /dev/tcp goes through the same socket(): refused too
    result = await client.run(
        f"echo hi > /dev/tcp/127.0.0.1/{nats_server.port} && echo connected", language="bash"
    )
    assert b"connected" not in result.stdout
    await answers_normally(client)


async def test_host_files_are_not_visible(client: SandboxClient, sandbox_service: RunningService) -> None:
    paths = [
        "/etc/shadow",
        "/etc/hostname",
        "/root/.bashrc",
        str(Path(__file__).resolve()),
        str(sandbox_service.config_path),
        "/work",
        "/home",
        "/var/log",
    ]
    code = f"""
import json, os
res = {{}}
for p in {paths!r}:
    try:
        if os.path.isdir(p):
            os.listdir(p)
        else:
            open(p, "rb").read()
        res[p] = "read"
    except OSError as exc:
        res[p] = exc.errno
print(json.dumps(res))
"""
    report = out_json(await client.run(code))
    assert "read" not in report.values(), report
    # /etc/passwd exists, but it is the sandbox's own two lines, not the host's
    result = await client.run("print(open('/etc/passwd').read(), end='')")
    assert result.stdout.decode() == ETC_FILES["/etc/passwd"] != Path("/etc/passwd").read_text()
    await answers_normally(client)


async def test_service_environment_is_not_visible(client: SandboxClient) -> None:
    code = """
import json, os
seen = {"environ": dict(os.environ), "proc": {}}
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            seen["proc"][pid] = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
        except OSError as exc:
            seen["proc"][pid] = exc.errno
print(json.dumps(seen))
"""
    result = await client.run(code)
    report = out_json(result)
    assert SECRET.encode() not in result.stdout, "the service's environment leaked into the sandbox"
    assert "1" in report["proc"], "expected to see the sandbox's own init as pid 1"
    assert set(report["environ"]) <= {"PATH", "LANG", "HOME", "PWD"}, report["environ"]
    bash = await client.run("cat /proc/1/environ; env", language="bash")
    assert SECRET.encode() not in bash.stdout + bash.stderr
    await answers_normally(client)


async def test_mount_ptrace_unshare_setuid_are_refused(client: SandboxClient) -> None:
    code = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    rc = getattr(libc, name)(*args)
    return "ok" if rc == 0 else ctypes.get_errno()
res = {
    "mount_tmpfs": call("mount", b"none", b"/tmp/w", b"tmpfs", 0, None),
    "remount_usr_rw": call("mount", None, b"/usr", None, 32 | 4096, None),  # MS_REMOUNT|MS_BIND
    "ptrace_attach_1": call("ptrace", 16, 1, None, None),
    "ptrace_traceme": call("ptrace", 0, 0, None, None),
    "unshare_user": call("unshare", 0x10000000),
    "unshare_net": call("unshare", 0x40000000),
    "unshare_mnt": call("unshare", 0x00020000),
    "setuid_0": call("setuid", 0),
    "setgid_0": call("setgid", 0),
    "chroot": call("chroot", b"/tmp"),
}
try:
    open(f"/proc/{os.getppid()}/mem", "rb").read(1)
    res["worker_mem"] = "ok"
except OSError as exc:
    res["worker_mem"] = exc.errno
print(json.dumps(res))
"""
    report = out_json(await client.run(code))
    assert "ok" not in report.values(), report
    # the same from bash tools
    result = await client.run(
        "unshare -U true && echo UNSHARED; mount -t tmpfs none /tmp && echo MOUNTED; true", language="bash"
    )
    assert b"UNSHARED" not in result.stdout and b"MOUNTED" not in result.stdout
    await answers_normally(client)


async def test_tiocsti_cannot_inject_keystrokes(client: SandboxClient) -> None:
    code = """
import fcntl, json, os, termios
res = {}
for name in ("stdin", "/dev/tty"):
    try:
        fd = 0 if name == "stdin" else os.open(name, os.O_RDWR)
        fcntl.ioctl(fd, termios.TIOCSTI, b"x")
        res[name] = "injected"
    except OSError as exc:
        res[name] = exc.errno
res["sid_is_own"] = os.getsid(0) == os.getpid() or os.getsid(0) != os.getsid(1)
print(json.dumps(res))
"""
    report = out_json(await client.run(code))
    assert report["stdin"] != "injected" and report["/dev/tty"] != "injected", report
    await answers_normally(client)


async def test_runs_share_no_state(client: SandboxClient) -> None:
    code = "import os\nopen('/tmp/w/left', 'w').write('x')\nopen('/tmp/left', 'w').write('x')\nos.environ['X'] = '1'\n"
    assert (await client.run(code)).status == pb.EXEC_STATUS_OK
    for _ in range(3):  # idle workers are taken in turn: these runs cover the one that ran the code
        check = await client.run(
            "import os\nprint(os.path.exists('/tmp/w/left'), os.path.exists('/tmp/left'), 'X' in os.environ)"
        )
        assert check.stdout == b"False False False\n", check.stdout


async def test_deep_unwipeable_trees_in_tmp_do_not_reach_the_next_run(client: SandboxClient) -> None:
    # deeper than PATH_MAX and chmod 000: the worker cannot simply wipe it, so it is replaced
    code = """
import os
for i in range(1500):
    os.mkdir("dd")
    os.chdir("dd")
os.chdir("/tmp/w")
for i in range(500):
    open(f"/tmp/f{i}", "w").close()
os.chmod("dd", 0)
print("planted")
"""
    result = await client.run(code)
    assert result.status == pb.EXEC_STATUS_OK and result.stdout == b"planted\n", result.stderr[-500:]
    for _ in range(4):  # whichever worker takes the next runs, none sees the tree
        check = await client.run("import os\nprint(sorted(os.listdir('/tmp')), sorted(os.listdir('/tmp/w')))")
        assert check.stdout == b"['w'] ['main.py']\n", check.stdout
    await answers_normally(client)
