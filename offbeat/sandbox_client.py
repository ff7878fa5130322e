"""Client of the sandbox service, and `offbeat sandbox exec`.

`SandboxClient` sends a `SandboxExecRequest` on `<prefix>.sandbox.exec` (request/reply; the service
replicas share a queue group) and returns the `SandboxExecResult`. It retries when no replica
answers (no responders, timeout) and when the answer is `OVERLOADED`, with a short backoff, then
raises `SandboxUnavailable` (no answer) or returns the `OVERLOADED` result. The reply timeout is
twice the request's own wall-clock budget (per test in test mode) plus a margin, so a slow run is
answered (TIMEOUT, a judgement) rather than lost to a client timeout (not judged).

Test mode (`run_tests`): a `TestCase` with `function` + `args_json` + `expected_json` calls
`function(*args)` and compares with exact types; `stdin` + `expected_stdout` runs the program and
compares stdout (trailing whitespace stripped); `assert_code` runs after the solution's
definitions. The result has one `TestResult` per test and `tests_passed`.

Not covered: isolation and grading (the service), choosing what to run (the scorer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from offbeat.v1 import sandbox_pb2

DEFAULT_SUBJECT: Final = "offbeat.sandbox.exec"
MARGIN_S: Final = 5.0
"""Reply timeout over a request's own wall-clock budget (queueing, worker hand-off, transport)."""
DEFAULT_WALL_S: Final = 10.0
"""Wall-clock budget assumed per run when a request leaves it to the service's default."""

LANGUAGES: Final = {"python": sandbox_pb2.LANGUAGE_PYTHON, "bash": sandbox_pb2.LANGUAGE_BASH}


class SandboxUnavailable(Exception):
    """No sandbox answered (no responders, or timeouts) after the retries."""


class SandboxClient:
    """Request/reply client; `nc` is a connected `nats.aio.client.Client` (e.g. `bus.nc`)."""

    def __init__(
        self, nc: Any, *, subject: str = DEFAULT_SUBJECT, timeout_s: float = 30.0, retries: int = 2
    ) -> None:
        self.nc = nc
        self.subject = subject
        self.timeout_s = timeout_s
        self.retries = retries

    def _timeout_for(self, request: sandbox_pb2.SandboxExecRequest) -> float:
        # twice the request's own budget: the service answers a run that used all of it (even
        # after waiting for a worker, which it bounds) before the client gives up and retries
        wall = request.limits.wall_timeout_s or DEFAULT_WALL_S
        runs = max(1, len(request.tests))
        return max(self.timeout_s, 2 * runs * (wall + 1.0) + MARGIN_S)

    async def execute(
        self, request: sandbox_pb2.SandboxExecRequest, *, timeout_s: float | None = None
    ) -> sandbox_pb2.SandboxExecResult:
        import nats.errors

        original = request

        if not request.request_id:  # the caller's message is left as it was
            request = sandbox_pb2.SandboxExecRequest(request_id=uuid.uuid4().hex)
            request.MergeFrom(original)
        timeout = timeout_s if timeout_s is not None else self._timeout_for(request)
        payload = request.SerializeToString()
        last: str = ""
        result: sandbox_pb2.SandboxExecResult | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
            try:
                msg = await self.nc.request(self.subject, payload, timeout=timeout)
            except nats.errors.NoRespondersError:
                last = "no responders"
                continue
            except (nats.errors.TimeoutError, TimeoutError):
                last = f"no answer within {timeout:.1f}s"
                continue
            result = sandbox_pb2.SandboxExecResult.FromString(msg.data)
            if result.status != sandbox_pb2.EXEC_STATUS_OVERLOADED:
                return result
            last = "overloaded"
        if result is not None:
            return result  # OVERLOADED after every retry: the caller decides
        raise SandboxUnavailable(f"sandbox on {self.subject}: {last} after {self.retries + 1} attempts")

    async def run(
        self,
        code: str,
        *,
        language: str = "python",
        stdin: bytes = b"",
        args: Sequence[str] = (),
        files: Mapping[str, bytes] | None = None,
        limits: sandbox_pb2.ExecLimits | None = None,
    ) -> sandbox_pb2.SandboxExecResult:
        request = sandbox_pb2.SandboxExecRequest(
            language=LANGUAGES[language], code=code, stdin=stdin, args=list(args), files=dict(files or {})
        )
        if limits is not None:
            request.limits.CopyFrom(limits)
        return await self.execute(request)

    async def run_tests(
        self,
        code: str,
        tests: Sequence[sandbox_pb2.TestCase],
        *,
        limits: sandbox_pb2.ExecLimits | None = None,
    ) -> sandbox_pb2.SandboxExecResult:
        request = sandbox_pb2.SandboxExecRequest(
            language=sandbox_pb2.LANGUAGE_PYTHON, code=code, tests=list(tests)
        )
        if limits is not None:
            request.limits.CopyFrom(limits)
        return await self.execute(request)


def result_to_dict(result: sandbox_pb2.SandboxExecResult) -> dict[str, Any]:
    """JSON-ready view: enum names, stdout/stderr decoded as UTF-8 (replacing what is not)."""
    from google.protobuf.json_format import MessageToDict

    data = MessageToDict(result, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    data["status"] = sandbox_pb2.ExecStatus.Name(result.status).removeprefix("EXEC_STATUS_")
    data["stdout"] = result.stdout.decode("utf-8", errors="replace")
    data["stderr"] = result.stderr.decode("utf-8", errors="replace")
    for test in data.get("tests", []):
        test["status"] = str(test.get("status", "")).removeprefix("EXEC_STATUS_")
    return data


# --- `offbeat sandbox exec` ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("exec", help="run a program in the sandbox and print the result as JSON")
    p.add_argument("file", help="the program (use - for standard input)")
    p.add_argument("--lang", choices=sorted(LANGUAGES), default="python")
    p.add_argument("--stdin", help="file whose content is the program's standard input")
    p.add_argument("--timeout-s", type=float, default=0.0, help="wall-clock limit (0: the service's default)")
    p.add_argument("--memory-mb", type=int, default=0, help="address-space limit (0: the service's default)")
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument(
        "--subject", default=DEFAULT_SUBJECT, help="the service's subject (<bus prefix>.sandbox.exec)"
    )
    p.add_argument("arg", nargs="*", help="arguments passed to the program")


async def _exec(args: argparse.Namespace) -> int:
    import nats

    from offbeat.config import mask_url

    for given in (args.file, args.stdin):
        if given and given != "-" and not Path(given).is_file():
            print(f"offbeat sandbox exec: {given}: no such file", file=sys.stderr)
            return 2
    code = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    stdin = Path(args.stdin).read_bytes() if args.stdin else b""
    limits = sandbox_pb2.ExecLimits(wall_timeout_s=args.timeout_s, memory_bytes=args.memory_mb * 1024**2)
    try:
        nc = await nats.connect(
            args.nats_url, connect_timeout=5, max_reconnect_attempts=2, error_cb=_said_below
        )
    except (nats.errors.NoServersError, OSError) as exc:
        print(
            f"offbeat sandbox exec: no NATS server at {mask_url(args.nats_url)} ({exc}): pass the run's "
            "--nats-url (`offbeat infra status --state-dir <the run's state_dir>` prints it)",
            file=sys.stderr,
        )
        return 2
    try:
        client = SandboxClient(nc, subject=args.subject)
        result = await client.run(code, language=args.lang, stdin=stdin, args=args.arg, limits=limits)
    except SandboxUnavailable as exc:
        print(json.dumps({"status": "UNAVAILABLE", "error": str(exc)}))
        return 2
    finally:
        await nc.close()
    print(json.dumps(result_to_dict(result), indent=2))
    return 0 if result.status == sandbox_pb2.EXEC_STATUS_OK else 1


async def _said_below(exc: Exception) -> None:
    """nats-py's error callback: a failed connect is reported once, by `_exec`."""


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_exec(args))
