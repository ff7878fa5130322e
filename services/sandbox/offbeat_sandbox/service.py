"""The sandbox service: answers `SandboxExecRequest`s on `<prefix>.sandbox.exec` in a queue group.

Any number of replicas serve the same subject in one NATS queue group; each runs a warm pool of
isolated workers (`pool`, `isolation`). A request waits for an idle worker; when `max_queue`
requests already wait, it is answered `OVERLOADED` at once, and so is one that waited
`max_queue_wait_s`, so callers back off instead of piling up (and a request is answered well
within the client's timeout, which covers its own budget twice). Limits a request leaves at 0 get the configured defaults; larger ones are cut to the
configured ceilings. Metrics: runs by status, latency histogram, pool occupancy.

`SANDBOX_ERROR` means the request could not be run as given (the reason is in `error`). A run that
takes its worker down (kills or stops it, leaves behind what cannot be cleaned) is the run's own
failure, `RUNTIME_ERROR`: otherwise a policy could turn a zero into "not judged".

Not covered: the isolation itself (`isolation`), the worker (`worker_main`), grading (`grader`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import secrets
import time
from typing import Any

from prometheus_client import Counter, Histogram

from offbeat.service import ServiceContext
from offbeat.v1 import sandbox_pb2 as pb
from offbeat_sandbox.config import SandboxConfig
from offbeat_sandbox.grader import InvalidRequest, grade_test, test_units, unit_bytes, unit_status
from offbeat_sandbox.isolation import SandboxSpec, claim_uid_block, find_bwrap, python_runtime, seccomp_bpf
from offbeat_sandbox.pool import Pool, PoolBusy, WorkerError

log = logging.getLogger("offbeat_sandbox.service")

RUNS = Counter("offbeat_sandbox_runs_total", "Requests answered, by status", ["status"])
TESTS = Counter("offbeat_sandbox_tests_total", "Test cases graded", ["passed"])
LATENCY = Histogram(
    "offbeat_sandbox_request_seconds",
    "Time from receiving a request to answering it",
    buckets=(0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5, 30, 120),
)
MAX_FILES = 256


def _status_name(status: int) -> str:
    return pb.ExecStatus.Name(status).removeprefix("EXEC_STATUS_")  # type: ignore[arg-type]


class Sandbox:
    """Runs requests on a pool; usable without the bus (tests, the benchmark)."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.pool: Pool | None = None
        self._uid_locks: list[int] = []

    async def start(self) -> None:
        cfg = self.config
        spec = SandboxSpec(
            bwrap=find_bwrap(cfg.bwrap),
            runtime=await asyncio.to_thread(python_runtime, cfg.python_prefix, cfg.runtime_dir),
            tmpfs_bytes=cfg.tmpfs_bytes,
            seccomp=seccomp_bpf() if cfg.seccomp else None,
            extra_ro_binds=list(cfg.extra_ro_binds),
            cgroup_memory_bytes=(
                cfg.worker_memory_bytes or cfg.max_memory_bytes + cfg.tmpfs_bytes + 256 * 1024**2
            )
            if cfg.cgroups
            else 0,
            cgroup_pids=cfg.worker_processes or cfg.max_processes + 16,
        )
        uid_base, self._uid_locks = claim_uid_block(
            cfg.uid_base, cfg.workers, os.path.join(cfg.runtime_dir, "locks")
        )
        self.pool = Pool(
            spec,
            size=cfg.workers,
            uid_base=uid_base,
            recycle_after_runs=cfg.recycle_after_runs,
            start_timeout_s=cfg.worker_start_timeout_s,
        )
        await self.pool.start()
        log.info(
            "sandbox pool ready",
            extra={
                "workers": cfg.workers,
                "uids": f"{uid_base}-{uid_base + cfg.workers - 1}",
                "bwrap": spec.bwrap,
                "seccomp": spec.seccomp is not None,
                "cgroups": self.pool.cgroups_in_use(),
            },
        )

    async def drain(self, timeout_s: float) -> None:
        """Wait (up to `timeout_s`) for the requests already taken to be answered."""
        for _ in range(max(1, int(timeout_s / 0.05))):
            if self.pool is None or not (self.pool.busy or self.pool.waiting):
                return
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        for fd in self._uid_locks:
            os.close(fd)
        self._uid_locks = []

    def limits(self, req: pb.ExecLimits) -> dict[str, Any]:
        c = self.config

        def pick(value: float, default: float, ceiling: float) -> float:
            return min(value, ceiling) if value > 0 else min(default, ceiling)

        return {
            "wall": pick(req.wall_timeout_s, c.default_wall_timeout_s, c.max_wall_timeout_s),
            "cpu": pick(req.cpu_time_s, c.default_cpu_time_s, c.max_cpu_time_s),
            "mem": int(pick(req.memory_bytes, c.default_memory_bytes, c.max_memory_bytes)),
            "out": int(pick(req.output_bytes, c.default_output_bytes, c.max_output_bytes)),
            "fsize": int(pick(req.file_size_bytes, c.default_file_size_bytes, c.max_file_size_bytes)),
            "nproc": int(pick(req.max_processes, c.default_max_processes, c.max_processes)),
            "nofile": int(pick(req.max_open_files, c.default_max_open_files, c.max_open_files)),
        }

    def _validate(self, req: pb.SandboxExecRequest) -> str:
        if req.language not in (pb.LANGUAGE_UNSPECIFIED, pb.LANGUAGE_PYTHON, pb.LANGUAGE_BASH):
            raise InvalidRequest(f"unknown language {req.language}")
        size = len(req.code) + len(req.stdin) + sum(len(v) for v in req.files.values())
        size += sum(len(t.stdin) + len(t.assert_code) + len(t.args_json) for t in req.tests)
        if size > self.config.max_request_bytes:
            raise InvalidRequest(f"request of {size} bytes is over max_request_bytes")
        if len(req.tests) > self.config.max_tests:
            raise InvalidRequest(f"{len(req.tests)} tests is over max_tests")
        if len(req.files) > MAX_FILES:
            raise InvalidRequest(f"more than {MAX_FILES} files")
        for name in req.files:
            norm = posixpath.normpath(name)
            if not name or norm != name or name.startswith(("/", "..")) or "\0" in name:
                raise InvalidRequest(f"file name {name!r} must be a plain relative path")
            if name in ("main.py", "main.sh"):
                raise InvalidRequest(f"file name {name!r} is reserved for the code")
        return "bash" if req.language == pb.LANGUAGE_BASH else "python"

    async def execute(self, req: pb.SandboxExecRequest) -> pb.SandboxExecResult:
        """Run (or test) one request; every failure is a status in the result, never an exception."""
        started = time.perf_counter()
        result = pb.SandboxExecResult(request_id=req.request_id)
        try:
            result = await self._execute(req, result)
        except InvalidRequest as exc:
            result.status, result.error = pb.EXEC_STATUS_SANDBOX_ERROR, str(exc)
        except PoolBusy as exc:
            result.status, result.error = pb.EXEC_STATUS_OVERLOADED, f"sandbox busy: {exc}"
        except WorkerError as exc:
            # The worker is trusted code that only dies, stalls or stops early when the run made it
            # (killed or stopped its parent, left what cannot be cleaned): the run's failure, not a
            # failure to judge it, or a policy could dodge a zero by taking its sandbox down.
            log.warning("request %s: %s", req.request_id, exc)
            result.status = pb.EXEC_STATUS_RUNTIME_ERROR
            result.error = f"the run took down its sandbox worker: {exc}"[:2000]
        except Exception as exc:
            # grading reads what the run wrote; whatever in it breaks the grader is the run's
            # failure too (an exception here would leave the request unanswered: SANDBOX_ERROR)
            log.exception("request %s: grading failed", req.request_id)
            result.status = pb.EXEC_STATUS_RUNTIME_ERROR
            result.error = f"the run's output could not be graded: {type(exc).__name__}: {exc}"[:2000]
        if req.tests and len(result.tests) != len(req.tests):  # executed == given, or nothing passes
            del result.tests[:]
            result.tests.extend(
                pb.TestResult(index=i, passed=False, status=result.status, message=result.error)
                for i in range(len(req.tests))
            )
            result.tests_passed = 0
        LATENCY.observe(time.perf_counter() - started)
        RUNS.labels(_status_name(result.status)).inc()
        return result

    async def _execute(
        self, req: pb.SandboxExecRequest, result: pb.SandboxExecResult
    ) -> pb.SandboxExecResult:
        assert self.pool is not None
        language = self._validate(req)
        if self.pool.waiting >= self.config.max_queue:
            result.status, result.error = pb.EXEC_STATUS_OVERLOADED, "sandbox queue is full"
            return result
        lim = self.limits(req.limits)
        nonce = secrets.token_hex(16)
        if req.tests:
            units, plans = test_units(list(req.tests), language)
        else:
            units, plans = [{"kind": "run", "stdin": bytes(req.stdin), "test": 0}], []
        job = {
            "lang": language,
            "code": req.code,
            "args": list(req.args),
            "files": {k: bytes(v) for k, v in req.files.items()},
            "limits": lim,
            "nonce": nonce,
            "units": units,
        }
        outcomes: list[dict[str, Any]] = []
        if units:
            deadline = len(units) * (lim["wall"] + 1.0) + self.config.grace_s
            answer = await self.pool.run(job, timeout_s=deadline, max_wait_s=self.config.max_queue_wait_s)
            outcomes = answer.get("units") or []
            if not isinstance(outcomes, list) or len(outcomes) > len(units):
                raise WorkerError("worker answered more units than it was given")
            if len(outcomes) < len(units):
                raise WorkerError(
                    f"worker ran {len(outcomes)} of {len(units)} units: {answer.get('anomaly')}"
                )
        if not req.tests:
            self._fill(result, outcomes[0], lim)
            return result
        by_test = {u["test"]: o for u, o in zip(units, outcomes, strict=True)}
        first_failed: dict[str, Any] | None = None
        for plan in plans:
            if plan.kind == "skip":
                tr = pb.TestResult(
                    index=plan.index, status=pb.EXEC_STATUS_RUNTIME_ERROR, message=plan.message
                )
            else:
                outcome = by_test[plan.index]
                tr = grade_test(plan, outcome, nonce, lim)
                if not tr.passed and first_failed is None:
                    first_failed = outcome
            result.tests.append(tr)
            TESTS.labels(str(tr.passed).lower()).inc()
        result.tests_passed = sum(1 for t in result.tests if t.passed)
        shown = first_failed or (outcomes[0] if outcomes else None)
        if shown is not None:
            self._fill(result, shown, lim)
        result.wall_s = sum(float(o.get("wall", 0.0)) for o in outcomes)
        result.cpu_s = sum(float(o.get("cpu", 0.0)) for o in outcomes)
        result.peak_memory_bytes = max((int(o.get("maxrss", 0)) for o in outcomes), default=0)
        bad = [t.status for t in result.tests if t.status != pb.EXEC_STATUS_OK]
        result.status = bad[0] if bad else pb.EXEC_STATUS_OK
        return result

    @staticmethod
    def _fill(result: pb.SandboxExecResult, unit: dict[str, Any], lim: dict[str, Any]) -> None:
        result.status = unit_status(unit, lim)  # type: ignore[assignment]
        result.exit_code = -1 if unit.get("exit") is None else int(unit["exit"])
        result.signal = int(unit.get("signal") or 0)
        result.wall_s = float(unit.get("wall", 0.0))
        result.cpu_s = float(unit.get("cpu", 0.0))
        result.peak_memory_bytes = int(unit.get("maxrss", 0))
        result.stdout = unit_bytes(unit, "stdout")
        result.stderr = unit_bytes(unit, "stderr")
        result.stdout_truncated = bool(unit.get("out_trunc"))
        result.stderr_truncated = bool(unit.get("err_trunc"))


def fit_reply(result: pb.SandboxExecResult, limit: int) -> pb.SandboxExecResult:
    """Cut stdout/stderr (marking them truncated) so the reply fits one NATS message of `limit` bytes."""
    room = limit - 4096
    if result.ByteSize() <= room:
        return result
    fixed = result.ByteSize() - len(result.stdout) - len(result.stderr)
    keep = max(0, room - fixed)
    out_keep = min(len(result.stdout), keep // 2 if result.stderr else keep)
    err_keep = max(0, min(len(result.stderr), keep - out_keep))
    if out_keep < len(result.stdout):
        result.stdout, result.stdout_truncated = result.stdout[:out_keep], True
    if err_keep < len(result.stderr):
        result.stderr, result.stderr_truncated = result.stderr[:err_keep], True
    result.error = (result.error + "; " if result.error else "") + "output cut to fit the bus's max payload"
    return result


def _malformed(reason: str) -> pb.SandboxExecResult:
    RUNS.labels("SANDBOX_ERROR").inc()
    return pb.SandboxExecResult(status=pb.EXEC_STATUS_SANDBOX_ERROR, error=reason)


async def serve(ctx: ServiceContext[SandboxConfig]) -> None:
    if os.geteuid() != 0:
        log.warning("not root: workers cannot switch to per-slot uids; bwrap may fail")
    sandbox = Sandbox(ctx.config)
    await sandbox.start()
    subject = ctx.bus.subjects.sandbox_exec
    max_payload = int(ctx.bus.nc.max_payload or ctx.run.bus.max_payload_bytes)

    async def answer(request: pb.SandboxExecRequest) -> pb.SandboxExecResult:
        return fit_reply(await sandbox.execute(request), max_payload)

    sub = await ctx.bus.serve(
        subject, pb.SandboxExecRequest, answer, queue=ctx.config.queue_group, on_malformed=_malformed
    )
    ctx.details.update({"subject": subject, "workers": ctx.config.workers})

    def occupancy() -> None:
        pool = sandbox.pool
        if pool is not None:
            ctx.details.update(
                {
                    "busy": pool.busy,
                    "idle": pool.idle,
                    "waiting": pool.waiting,
                    "restart_failures": pool.restart_failures,
                }
            )
            ctx.set_healthy(pool.restart_failures < 3)  # workers that cannot be started: unhealthy

    ctx.set_healthy()
    log.info("serving %s in queue group %s", subject, ctx.config.queue_group)
    try:
        while not ctx.stop.is_set():
            occupancy()
            try:
                await asyncio.wait_for(ctx.stop.wait(), timeout=1.0)
            except TimeoutError:
                pass
    finally:
        ctx.set_healthy(False)
        await sub.unsubscribe()
        await sandbox.drain(ctx.config.shutdown_timeout_s * 0.8)
        await sandbox.close()
