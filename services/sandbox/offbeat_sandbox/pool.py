"""The warm pool: long-lived isolated workers, one bwrap sandbox each, handed out one job at a time.

A worker slot has its own host uid. A worker is started by exec'ing bwrap as that uid with the
worker program (`worker_main`) as the sandboxed command, and reports ready over its result pipe.
It is replaced (killed with every process of its uid, then started afresh) after
`recycle_after_runs` jobs, after any anomaly it reports, when it dies, or when it misses the job's
deadline. Callers wait for an idle worker; the service bounds how many may wait.

Not covered: what a job contains and what its result means (`grader`), the bus (`service`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import marshal
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from offbeat_sandbox.cgroups import WorkerCgroup
from offbeat_sandbox.isolation import ETC_FILES, SandboxSpec, kill_uid, processes_of_uid

log = logging.getLogger("offbeat_sandbox.pool")

WORKER_SOURCE = (Path(__file__).with_name("worker_main.py")).read_text()
MAX_RESULT_BYTES = 256 * 1024**2

WORKERS_STARTED = Counter("offbeat_sandbox_workers_started_total", "Workers started")
WORKERS_RECYCLED = Counter("offbeat_sandbox_workers_recycled_total", "Workers replaced", ["reason"])
POOL_BUSY = Gauge("offbeat_sandbox_pool_busy", "Workers running a job")
POOL_IDLE = Gauge("offbeat_sandbox_pool_idle", "Workers ready for a job")
POOL_WAITING = Gauge("offbeat_sandbox_pool_waiting", "Requests waiting for a worker")


class WorkerError(Exception):
    """The worker died, broke the protocol or missed its deadline; it has been killed."""


class PoolBusy(Exception):
    """No worker became idle in time: the request was not run."""


class Worker:
    """One bwrap sandbox running `worker_main`, driven over two pipes."""

    def __init__(self, slot: int, uid: int, spec: SandboxSpec) -> None:
        self.slot = slot
        self.uid = uid
        self.spec = spec
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._job_transport: asyncio.WriteTransport | None = None
        self._res_transport: asyncio.ReadTransport | None = None
        self._seq = 0
        self.cgroup: WorkerCgroup | None = None

    async def start(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        kill_uid(self.uid)  # leftovers of a previous worker of this slot
        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        passed = [job_r, res_w]
        seccomp_fd = None
        if self.spec.seccomp is not None:
            sc_r, sc_w = os.pipe()
            os.write(sc_w, self.spec.seccomp)  # a few KiB: fits the pipe buffer
            os.close(sc_w)
            seccomp_fd = sc_r
            passed.append(sc_r)
        etc_fds = {}
        for path, content in ETC_FILES.items():
            data_r, data_w = os.pipe()
            os.write(data_w, content.encode())  # tiny: fits the pipe buffer
            os.close(data_w)
            etc_fds[path] = data_r
            passed.append(data_r)
        block_w = None
        if self.spec.cgroup_memory_bytes:
            self.cgroup = WorkerCgroup.create(
                f"offbeat-sandbox-{self.uid}",
                memory_bytes=self.spec.cgroup_memory_bytes,
                pids_max=self.spec.cgroup_pids,
            )
        if self.cgroup is not None:
            block_r, block_w = os.pipe()
            passed.append(block_r)
        argv = self.spec.argv(
            seccomp_fd=seccomp_fd,
            worker_source=WORKER_SOURCE,
            job_fd=job_r,
            result_fd=res_w,
            block_fd=passed[-1] if block_w is not None else None,
            etc_fds=etc_fds,
        )
        try:
            # Popen from the event loop's thread: --die-with-parent follows the thread that forked
            self.proc = subprocess.Popen(  # noqa: ASYNC220
                argv,
                pass_fds=passed,
                user=self.uid,
                group=self.uid,
                extra_groups=[],
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                cwd="/",
            )
        finally:
            for fd in passed:
                os.close(fd)
        if block_w is not None:
            try:
                await self._enter_cgroup(timeout_s)
            except (WorkerError, OSError):
                self.kill()
                os.close(job_w)
                os.close(res_r)
                raise
            finally:
                with contextlib.suppress(OSError):  # (a killed bwrap reads nothing)
                    os.write(block_w, b"x")  # bwrap goes on and execs the worker
                os.close(block_w)
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        reader = asyncio.StreamReader(limit=MAX_RESULT_BYTES)
        self._res_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(res_r, "rb", 0)
        )
        self._reader = reader
        self._job_transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(job_w, "wb", 0))
        try:
            ready = await asyncio.wait_for(self._read_frame(), timeout=timeout_s)
        except (TimeoutError, WorkerError) as exc:
            detail = self.stderr_tail()
            self.kill()
            raise WorkerError(f"worker {self.slot} did not start: {exc!r} {detail}") from None
        if not ready.get("ready"):
            self.kill()
            raise WorkerError(f"worker {self.slot} sent {ready!r} instead of ready")
        WORKERS_STARTED.inc()

    async def _enter_cgroup(self, timeout_s: float) -> None:
        """Move bwrap (both processes, held on --block-fd before the worker starts) to the cgroup;
        everything they fork from then on is born in it."""
        assert self.proc is not None and self.cgroup is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = processes_of_uid(self.uid)  # bwrap, and its clone in the new namespaces
            for pid in pids:
                self.cgroup.add(pid)
            if len(pids) >= 2 or self.proc.poll() is not None:
                return
            await asyncio.sleep(0.002)
        raise WorkerError(f"worker {self.slot}: bwrap did not reach its block point")

    async def _read_frame(self) -> dict[str, Any]:
        assert self._reader is not None
        try:
            head = await self._reader.readexactly(4)
            size = int.from_bytes(head, "big")
            if size > MAX_RESULT_BYTES:
                raise WorkerError(f"result frame of {size} bytes")
            body = await self._reader.readexactly(size)
        except asyncio.IncompleteReadError:
            raise WorkerError("worker closed its result pipe") from None
        try:
            frame = json.loads(body)
        except ValueError as exc:
            raise WorkerError(f"unparsable result frame: {exc}") from None
        if not isinstance(frame, dict):
            raise WorkerError("result frame is not an object")
        return frame

    async def execute(self, job: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        """Send one job, wait for its result; on death or deadline kill the worker and raise."""
        assert self._job_transport is not None
        self._seq += 1
        job = {**job, "id": self._seq}
        body = marshal.dumps(job)
        self.runs += 1
        ooms = self.cgroup.oom_kills() if self.cgroup is not None else 0
        self._job_transport.write(len(body).to_bytes(4, "big") + body)
        try:
            result = await asyncio.wait_for(self._read_frame(), timeout=timeout_s)
        except TimeoutError:
            self.kill()
            raise WorkerError(f"worker {self.slot} missed its deadline of {timeout_s:.1f}s") from None
        except WorkerError as exc:
            detail = self.stderr_tail()
            self.kill()
            raise WorkerError(f"worker {self.slot}: {exc} {detail}") from None
        if result.get("id") != self._seq:
            self.kill()
            raise WorkerError(f"worker {self.slot} answered job {result.get('id')!r}, expected {self._seq}")
        if self.cgroup is not None and self.cgroup.oom_kills() > ooms:
            # the kernel killed a process of this job for the tree's memory limit: the units whose
            # main process it killed, or (a child was killed) every unit of the job
            units = [u for u in result.get("units") or [] if isinstance(u, dict)]
            for unit in [u for u in units if u.get("signal") == 9] or units:
                unit["oom"] = True
        return result

    def stderr_tail(self) -> str:
        if self.proc is None or self.proc.stderr is None:
            return ""
        with contextlib.suppress(OSError, TypeError):
            data = self.proc.stderr.read(65536) or b""
            return data.decode(errors="replace")[-2000:]
        return ""

    def kill(self) -> None:
        """Kill the sandbox and every host process of this slot's uid; close the pipes."""
        for transport in (self._job_transport, self._res_transport):
            if transport is not None:
                transport.close()
        self._job_transport = self._res_transport = None
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            kill_uid(self.uid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        if not kill_uid(self.uid):
            log.error("processes of uid %d survived SIGKILL", self.uid)
        elif self.cgroup is not None:
            self.cgroup.remove()


class Pool:
    """`size` workers; `run()` takes an idle one, and replaces it when it must be."""

    def __init__(
        self, spec: SandboxSpec, *, size: int, uid_base: int, recycle_after_runs: int, start_timeout_s: float
    ) -> None:
        self.spec = spec
        self.size = size
        self.uid_base = uid_base
        self.recycle_after_runs = recycle_after_runs
        self.start_timeout_s = start_timeout_s
        self._idle: asyncio.Queue[Worker] = asyncio.Queue()
        self._replacing: set[asyncio.Task[None]] = set()
        self._all: dict[int, Worker] = {}
        self.waiting = 0
        self.busy = 0
        self.closed = False
        self.restart_failures = 0  # failed starts in a row of replacement workers: health turns on it

    async def start(self) -> None:
        """Start every worker (sequentially: each spawn blocks the loop for a moment)."""
        for slot in range(self.size):
            worker = Worker(slot, self.uid_base + slot, self.spec)
            await worker.start(self.start_timeout_s)
            self._all[slot] = worker
            self._idle.put_nowait(worker)
        self._gauges()

    def _gauges(self) -> None:
        POOL_BUSY.set(self.busy)
        POOL_IDLE.set(self._idle.qsize())
        POOL_WAITING.set(self.waiting)

    async def run(
        self, job: dict[str, Any], *, timeout_s: float, max_wait_s: float | None = None
    ) -> dict[str, Any]:
        """Run a job on an idle worker; raises WorkerError if the worker failed (it is replaced),
        PoolBusy if no worker became idle within `max_wait_s`."""
        self.waiting += 1
        self._gauges()
        try:
            worker = await asyncio.wait_for(self._idle.get(), timeout=max_wait_s)
        except TimeoutError:
            raise PoolBusy(f"no worker idle within {max_wait_s:.1f}s") from None
        finally:
            self.waiting -= 1
        self.busy += 1
        self._gauges()
        started = time.monotonic()
        ok = False
        try:
            result = await worker.execute(job, timeout_s=timeout_s)
            ok = not result.get("anomaly")
            if not ok:
                log.warning("worker %d anomaly: %s", worker.slot, result["anomaly"])
            return result
        finally:
            self.busy -= 1
            if ok and worker.runs < self.recycle_after_runs and not self.closed:
                self._idle.put_nowait(worker)
            else:
                reason = "anomaly" if not ok else "runs"
                if not ok and worker._job_transport is None:
                    reason = "failed"
                log.debug(
                    "recycling worker %d (%s) after %.3fs", worker.slot, reason, time.monotonic() - started
                )
                WORKERS_RECYCLED.labels(reason).inc()
                self._replace(worker)
            self._gauges()

    def _replace(self, worker: Worker) -> None:
        worker.kill()
        if self.closed:
            return
        task = asyncio.create_task(self._restart(worker.slot))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _restart(self, slot: int) -> None:
        delay = 0.1
        while not self.closed:
            worker = Worker(slot, self.uid_base + slot, self.spec)
            try:
                await worker.start(self.start_timeout_s)
            except (WorkerError, OSError) as exc:
                self.restart_failures += 1
                log.error("restarting worker %d failed: %s", slot, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self.closed:
                worker.kill()
                return
            self.restart_failures = 0
            self._all[slot] = worker
            self._idle.put_nowait(worker)
            self._gauges()
            return

    def cgroups_in_use(self) -> bool:
        return any(w.cgroup is not None for w in self._all.values())

    @property
    def idle(self) -> int:
        return self._idle.qsize()

    async def close(self) -> None:
        self.closed = True
        for task in list(self._replacing):
            task.cancel()
        for worker in self._all.values():
            worker.kill()
        self._all.clear()
