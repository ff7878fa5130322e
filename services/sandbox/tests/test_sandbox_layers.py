"""Each isolation layer holds on its own: with the seccomp filter off, namespaces and dropped
capabilities still refuse the network, mounts, namespaces and ptrace; with it on, it is loaded."""

from __future__ import annotations

import json
import os

import pytest
from offbeat_sandbox.config import SandboxConfig
from offbeat_sandbox.service import Sandbox

from offbeat.sandbox_client import SandboxClient
from offbeat.v1 import sandbox_pb2 as pb

pytestmark = pytest.mark.integration

PROBE = """
import ctypes, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    rc = getattr(libc, name)(*args)
    return "ok" if rc == 0 else ctypes.get_errno()
res = {}
for host, port in (("127.0.0.1", PORT), ("10.255.255.1", 80), ("1.1.1.1", 53)):
    try:
        socket.create_connection((host, port), timeout=2)
        res[f"{host}:{port}"] = "ok"
    except OSError as exc:
        res[f"{host}:{port}"] = exc.errno
res["mount"] = call("mount", b"none", b"/tmp/w", b"tmpfs", 0, None)
res["remount_usr_rw"] = call("mount", None, b"/usr", None, 32 | 4096, None)
res["unshare_user"] = call("unshare", 0x10000000)
res["unshare_mnt"] = call("unshare", 0x00020000)
res["ptrace_worker"] = call("ptrace", 16, os.getppid(), None, None)
res["setuid_0"] = call("setuid", 0)
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
res["cap_eff"] = status["CapEff"].strip()
res["seccomp"] = status["Seccomp"].strip()
print(json.dumps(res))
"""
CONTAINED = ("127.0.0.1", "10.255.255.1", "1.1.1.1", "mount", "remount", "unshare", "ptrace", "setuid")


def _contained(report: dict) -> None:
    for key, value in report.items():
        if key.startswith(CONTAINED):
            assert value != "ok", f"{key} succeeded: {report}"
    assert report["cap_eff"] == "0000000000000000"


async def test_namespaces_hold_without_seccomp(nats_server) -> None:
    uid_base = 63500 + (os.getpid() % 400) * 8
    sandbox = Sandbox(SandboxConfig(workers=1, seccomp=False, uid_base=uid_base))
    await sandbox.start()
    try:
        code = PROBE.replace("PORT", str(nats_server.port))
        result = await sandbox.execute(
            pb.SandboxExecRequest(code=code, limits=pb.ExecLimits(wall_timeout_s=15))
        )
        assert result.status == pb.EXEC_STATUS_OK, result.stderr
        report = json.loads(result.stdout)
        assert report["seccomp"] == "0", "this test is about running without the filter"
        _contained(report)
    finally:
        await sandbox.close()


async def test_the_service_loads_its_seccomp_filter(client: SandboxClient, nats_server) -> None:
    result = await client.run(
        PROBE.replace("PORT", str(nats_server.port)), limits=pb.ExecLimits(wall_timeout_s=15)
    )
    report = json.loads(result.stdout)
    assert report["seccomp"] == "2", "no seccomp filter in the service's sandboxes"
    _contained(report)


async def test_memory_spread_over_processes_is_bounded_by_the_worker_cgroup() -> None:
    """Each process stays under RLIMIT_AS; together they exceed the worker's cgroup: MEMORY_LIMIT,
    even though the run's main process allocates nothing and exits 0."""
    uid_base = 63600 + (os.getpid() % 400) * 8
    sandbox = Sandbox(SandboxConfig(workers=1, uid_base=uid_base, worker_memory_bytes=300 * 1024**2))
    await sandbox.start()
    try:
        assert sandbox.pool is not None
        if not sandbox.pool.cgroups_in_use():
            pytest.skip("this host gives the service no writable cgroup (memory, pids)")
        code = """
import os, time
children = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        block = bytearray(150 * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(2)
        os._exit(0)
    children.append(pid)
print(sorted(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children))
"""
        limits = pb.ExecLimits(wall_timeout_s=20, memory_bytes=512 * 1024**2)
        result = await sandbox.execute(pb.SandboxExecRequest(code=code, limits=limits))
        assert result.status == pb.EXEC_STATUS_MEMORY_LIMIT, (
            result.status,
            result.stdout,
            result.stderr[-300:],
        )
        assert b"-9" in result.stdout, result.stdout  # at least one child was killed for the tree's limit
        after = await sandbox.execute(pb.SandboxExecRequest(code="print(1)"))
        assert after.status == pb.EXEC_STATUS_OK and after.stdout == b"1\n"
    finally:
        await sandbox.close()
