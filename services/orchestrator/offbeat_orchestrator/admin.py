"""The admin gRPC API (`offbeat.v1.AdminService`) on `grpc.aio`, with health and reflection.

Mutating calls (Pause, Resume, Rollback) publish a control command through `Bus.control` (which
also keeps the paused flag in KV), act on the scheduler in-process, and leave one
`admin_actions` row each, whatever the outcome (a refused token included; the caller's
`x-offbeat-actor` is cut to fit, and a row the ledger cannot take goes to the log rather than
failing an action already taken). A `reason` the ledger could not record (over 1,000 characters,
or with a NUL) is INVALID_ARGUMENT before anything is done. Rollback validates and marks the
ledger in one transaction first (NOT_FOUND for an unknown version, FAILED_PRECONDITION for a
rolled-back one), then publishes `control.rollback`. If that publish fails, the ledger stays
rolled back (the scheduler follows it) and the command is published again in the background, under
the same command id, until it goes through; the caller is answered UNAVAILABLE saying so. A
command still unpublished when the orchestrator stops is only in the log and the audit.

Read calls answer from the ledger, the KV bucket and the scheduler. WatchEvents streams the
events the ledger writer commits, as it commits them.

A request body that does not parse is answered INVALID_ARGUMENT with the parser's message
(`MalformedRequests`; grpc's own answer is UNKNOWN), after authentication.

Not covered: authentication (`auth`), the CLI (`offbeat.admin_cli`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from offbeat.bus import Bus
from offbeat.ledger import STATUSES, Ledger
from offbeat.ledger.store import PrunedVersionError, RolledBackVersionError, UnknownVersionError
from offbeat.v1 import admin_pb2, admin_pb2_grpc, policy_pb2
from offbeat_orchestrator.auth import BearerAuth
from offbeat_orchestrator.config import OrchestratorConfig
from offbeat_orchestrator.events import summarize
from offbeat_orchestrator.ledger_writer import LedgerWriter, Observed
from offbeat_orchestrator.scheduler import Scheduler

log = logging.getLogger("offbeat.orchestrator.admin")

SERVICE_NAME: Final = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
MUTATING: Final = {f"/{SERVICE_NAME}/{m}": m.lower() for m in ("Pause", "Resume", "Rollback")}
KIND_NAMES: Final = {
    "rollout.request": "request",
    "rollout.completion": "completion",
    "rollout.scored": "scored",
    "trainer.step": "step",
    "policy.weights": "policy",
    "policy.live": "live",
    "control": "control",
    "dlq": "dead_letter",
}
MAX_PAGE: Final = 1000
MAX_ACTOR: Final = 128
"""The ledger's `admin_actions.actor` column holds this many characters."""
MAX_REASON: Final = 1000
REPUBLISH_FIRST_S: Final = 0.5
REPUBLISH_MAX_S: Final = 10.0


def actor_of(context: grpc.aio.ServicerContext) -> str:
    """Who called: the `x-offbeat-actor` header (whatever the caller put there, so cut to fit the
    ledger, control characters dropped) and the peer address, which is kept whole."""
    metadata = dict(context.invocation_metadata() or ())
    peer = str(context.peer())
    who = "".join(c for c in str(metadata.get("x-offbeat-actor", "")) if c.isprintable())
    if not who:
        return peer[:MAX_ACTOR]
    return f"{who[: max(0, MAX_ACTOR - len(peer) - 1)]}@{peer}"[-MAX_ACTOR:]


def reason_problem(reason: str) -> str | None:
    """Why a mutating call's `reason` cannot be recorded as given (None: it can)."""
    if len(reason) > MAX_REASON:
        return f"reason is {len(reason)} characters, at most {MAX_REASON}"
    if "\x00" in reason:
        return "reason contains a NUL character"
    return None


def percentile(histogram: dict[int, int], q: float) -> float:
    total = sum(histogram.values())
    if not total:
        return 0.0
    rank, seen = q * (total - 1), 0
    for value, count in sorted(histogram.items()):
        seen += count
        if seen > rank:
            return float(value)
    return float(max(histogram))


def to_event(e: Observed) -> admin_pb2.Event:
    summary, fields = summarize(e.kind, e.message)
    return admin_pb2.Event(
        kind=KIND_NAMES.get(e.kind, e.kind), subject=e.subject, at=e.at, summary=summary, fields=fields
    )


@dataclass
class AdminContext:
    run_id: str
    bus: Bus
    ledger: Ledger
    writer: LedgerWriter
    scheduler: Scheduler | None
    cfg: OrchestratorConfig
    rollback_window: int = 0
    """The trainer's `rollback_window`: older versions are refused (0: no limit)."""


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        self.republishing: set[asyncio.Task[None]] = set()
        """Rollback commands whose publish failed after the ledger was rolled back, retried."""

    async def audit(self, action: str, args: dict[str, Any], context: Any, *, ok: bool, result: str) -> None:
        """One `admin_actions` row. The action has been taken (or refused) when this runs: a ledger
        that cannot take the row must not turn it into an error for the caller, so the record
        goes to the log instead."""
        await self._record(action, args, actor_of(context), ok=ok, result=result)

    async def _record(self, action: str, args: dict[str, Any], actor: str, *, ok: bool, result: str) -> None:
        try:
            await self.ctx.ledger.audit(self.ctx.run_id, action, args=args, actor=actor, ok=ok, result=result)
        except Exception as exc:
            log.error(
                "admin action not recorded in the ledger (%s: %s): %s by %s, ok=%s, %s",
                type(exc).__name__,
                str(exc)[:200],
                action,
                actor,
                ok,
                result,
            )

    async def _check_reason(self, action: str, args: dict[str, Any], reason: str, context: Any) -> None:
        """INVALID_ARGUMENT (and a row saying so) for a reason the ledger could not record, before
        anything is done."""
        problem = reason_problem(reason)
        if problem is not None:
            safe = args | {"reason": reason[:100].replace("\x00", "\ufffd")}
            await self.audit(action, safe, context, ok=False, result=f"INVALID_ARGUMENT: {problem}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)

    async def refused(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Called by the auth interceptor: a refused mutating call is audited too."""
        if method in MUTATING:
            await self.audit(MUTATING[method], {}, context, ok=False, result="UNAUTHENTICATED")

    async def _control(self, action: str, kind: Any, reason: str, context: Any) -> None:
        command_id = uuid.uuid4().hex
        try:
            await self.ctx.bus.control(kind, command_id=command_id, reason=reason)
        except Exception as exc:
            await self.audit(action, {"reason": reason}, context, ok=False, result=f"publish failed: {exc}")
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"could not publish control.{action}: {exc}")
        await self.audit(action, {"reason": reason, "command_id": command_id}, context, ok=True, result="ok")

    async def Pause(self, request: admin_pb2.PauseRequest, context: Any) -> admin_pb2.PauseResponse:
        await self._check_reason("pause", {}, request.reason, context)
        if self.ctx.scheduler is not None:
            self.ctx.scheduler.pause()
        await self._control("pause", policy_pb2.CONTROL_KIND_PAUSE, request.reason, context)
        log.info("paused by %s", actor_of(context))
        return admin_pb2.PauseResponse(paused=True)

    async def Resume(self, request: admin_pb2.ResumeRequest, context: Any) -> admin_pb2.ResumeResponse:
        await self._check_reason("resume", {}, request.reason, context)
        await self._control("resume", policy_pb2.CONTROL_KIND_RESUME, request.reason, context)
        if self.ctx.scheduler is not None:
            self.ctx.scheduler.resume()
        log.info("resumed by %s", actor_of(context))
        return admin_pb2.ResumeResponse(paused=False)

    async def Rollback(self, request: admin_pb2.RollbackRequest, context: Any) -> admin_pb2.RollbackResponse:
        args = {"version": request.version, "reason": request.reason}
        await self._check_reason("rollback", args, request.reason, context)
        try:
            result = await self.ctx.ledger.rollback_to(
                self.ctx.run_id, request.version, window=self.ctx.rollback_window
            )
        except UnknownVersionError as exc:
            message = str(exc.args[0])
            await self.audit("rollback", args, context, ok=False, result=f"NOT_FOUND: {message}")
            await context.abort(grpc.StatusCode.NOT_FOUND, message)
        except (RolledBackVersionError, PrunedVersionError) as exc:
            await self.audit("rollback", args, context, ok=False, result=f"FAILED_PRECONDITION: {exc}")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        command_id = uuid.uuid4().hex
        publish = functools.partial(
            self.ctx.bus.control,
            policy_pb2.CONTROL_KIND_ROLLBACK,
            command_id=command_id,
            version=request.version,
            reason=request.reason,
        )
        try:
            await publish()
        except Exception as exc:
            # the ledger is rolled back already: the trainer must follow it, so the command (its
            # id deduplicates repeats) is published again until it goes through
            if self.ctx.scheduler is not None:
                self.ctx.scheduler.rolled_back(result)
            task = asyncio.create_task(
                self._republish(publish, args | {"command_id": command_id}, actor_of(context))
            )
            self.republishing.add(task)
            task.add_done_callback(self.republishing.discard)
            message = f"ledger rolled back to {result.version}; control.rollback failed ({exc}), retrying"
            await self.audit("rollback", args | {"command_id": command_id}, context, ok=False, result=message)
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)
        if self.ctx.scheduler is not None:
            self.ctx.scheduler.rolled_back(result)
        summary = (
            f"rolled back to {result.version} (step {result.step}): versions {result.versions}, "
            f"{len(result.trajectory_ids)} trajectories discarded, {result.steps} steps"
        )
        await self.audit("rollback", args | {"command_id": command_id}, context, ok=True, result=summary)
        log.info("%s by %s", summary, actor_of(context))
        return admin_pb2.RollbackResponse(
            version=result.version,
            discarded_versions=len(result.versions),
            discarded_trajectories=len(result.trajectory_ids),
        )

    async def ListPolicies(
        self, request: admin_pb2.ListPoliciesRequest, context: Any
    ) -> admin_pb2.ListPoliciesResponse:
        rows = await self.ctx.ledger.list_policies(self.ctx.run_id)
        return admin_pb2.ListPoliciesResponse(
            policies=[
                admin_pb2.Policy(
                    version=r["version"],
                    step=r["step"],
                    parent=r["parent"],
                    uri=r["uri"],
                    sha256=r["sha256"],
                    status=r["status"],
                    created_at=r["created_at"].timestamp() if r["created_at"] else 0.0,
                    eval_reward=r["eval_reward"] or 0.0,
                    has_eval_reward=r["eval_reward"] is not None,
                )
                for r in rows
            ]
        )

    async def _republish(
        self, publish: Callable[[], Awaitable[None]], args: dict[str, Any], actor: str
    ) -> None:
        """Publish until it goes through (or the server stops: a command still unpublished then is
        in the log and in the ledger's audit as not published)."""
        delay = REPUBLISH_FIRST_S
        for attempt in itertools.count(1):
            await asyncio.sleep(delay)
            try:
                await publish()
            except Exception as exc:
                log.warning("control.rollback %s: retry %d failed: %s", args["command_id"], attempt, exc)
                delay = min(delay * 2, REPUBLISH_MAX_S)
                continue
            result = f"control.rollback published after {attempt} retries"
            await self._record("rollback", args, actor, ok=True, result=result)
            log.info("%s (%s)", result, args["command_id"])
            return

    async def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: Any
    ) -> admin_pb2.GetStatusResponse:
        ctx = self.ctx
        head = await ctx.bus.get_head()
        fates = await ctx.ledger.trajectory_fates(ctx.run_id)
        tokens_s, traj_s = ctx.writer.throughput()
        s = ctx.scheduler
        return admin_pb2.GetStatusResponse(
            run_id=ctx.run_id,
            step=s.step if s is not None else await ctx.ledger.latest_step(ctx.run_id),
            head_version=head.version if head is not None else 0,
            paused=await ctx.bus.is_paused(),
            groups_in_flight=len(s.groups) if s is not None else 0,
            trajectories_in_flight=s.trajectories_in_flight() if s is not None else 0,
            tokens_per_s=tokens_s,
            trajectories_per_s=traj_s,
            trajectories_by_status=fates,
        )

    async def GetStaleness(
        self, request: admin_pb2.GetStalenessRequest, context: Any
    ) -> admin_pb2.GetStalenessResponse:
        hist = await self.ctx.ledger.staleness_histogram(self.ctx.run_id)
        return admin_pb2.GetStalenessResponse(
            buckets=[admin_pb2.StalenessBucket(staleness=s, count=n) for s, n in sorted(hist.items())],
            p50=percentile(hist, 0.5),
            p95=percentile(hist, 0.95),
            max=max(hist, default=0),
            count=sum(hist.values()),
        )

    async def ListTrajectories(
        self, request: admin_pb2.ListTrajectoriesRequest, context: Any
    ) -> admin_pb2.ListTrajectoriesResponse:
        if request.status and request.status not in STATUSES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown status {request.status!r}; one of {', '.join(STATUSES)}",
            )
        try:
            after = (
                base64.urlsafe_b64decode(request.page_token.encode()).decode() if request.page_token else ""
            )
        except (binascii.Error, UnicodeDecodeError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_token is not one this server gave")
        if request.page_size < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"page_size must be >= 0 (0: 100), got {request.page_size}"
            )
        size = min(request.page_size or 100, MAX_PAGE)
        rows = await self.ctx.ledger.list_trajectories(
            self.ctx.run_id, status=request.status or None, after=after, limit=size + 1
        )
        more = len(rows) > size
        rows = rows[:size]
        token = base64.urlsafe_b64encode(rows[-1]["trajectory_id"].encode()).decode() if more else ""
        return admin_pb2.ListTrajectoriesResponse(
            trajectories=[
                admin_pb2.Trajectory(
                    trajectory_id=r["trajectory_id"],
                    group_id=r["group_id"] or "",
                    env=r["env"] or "",
                    status=r["status"],
                    reason=r["reason"] or "",
                    reward=r["reward"] or 0.0,
                    first_version=r["first_version"] if r["first_version"] is not None else -1,
                    last_version=r["last_version"] if r["last_version"] is not None else -1,
                    consumed_step=r["consumed_step"] if r["consumed_step"] is not None else -1,
                    staleness=r["staleness"] if r["staleness"] is not None else -1,
                )
                for r in rows
            ],
            next_page_token=token,
        )

    async def WatchEvents(
        self, request: admin_pb2.WatchEventsRequest, context: Any
    ) -> AsyncIterator[admin_pb2.Event]:
        kinds = set(request.kinds)
        queue: asyncio.Queue[Observed] = asyncio.Queue(self.ctx.cfg.watch_queue_size)

        def observe(events: list[Observed]) -> None:
            for e in events:
                if kinds and KIND_NAMES.get(e.kind, e.kind) not in kinds:
                    continue
                if queue.full():  # a slow client loses the oldest events, never blocks the writer
                    queue.get_nowait()
                queue.put_nowait(e)

        self.ctx.writer.observers.append(observe)
        try:
            while True:
                yield to_event(await queue.get())
        finally:
            self.ctx.writer.observers.remove(observe)


class _Malformed:
    """What a request body that does not parse deserializes to."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Answers a request whose body does not parse with INVALID_ARGUMENT and the reason."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def deserialize(body: bytes) -> Any:
            try:
                return parse(body)
            except DecodeError as exc:
                return _Malformed(f"malformed request body: {exc}")

        if handler.response_streaming:
            stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                async for item in stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, deserialize, handler.response_serializer
            )
        unary = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, handler.response_serializer)


class AdminServer:
    """The grpc.aio server: AdminService behind bearer auth, plus health and reflection."""

    def __init__(self, ctx: AdminContext, token: str) -> None:
        self.servicer = AdminServicer(ctx)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            # auth first: an unauthenticated caller learns nothing about its request body
            interceptors=[BearerAuth(token, on_denied=self.servicer.refused), MalformedRequests()],
            options=[("grpc.so_reuseport", 0)],  # a second orchestrator on the port fails, never shares it
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        cfg = ctx.cfg
        creds = None
        if cfg.tls_cert_file and cfg.tls_key_file:
            with open(cfg.tls_key_file, "rb") as key, open(cfg.tls_cert_file, "rb") as cert:
                creds = grpc.ssl_server_credentials([(key.read(), cert.read())])
        self.tls = creds is not None
        self.port = self._bind(cfg.admin_host, cfg.admin_port, creds)
        if not self.port and cfg.admin_port:
            # another orchestrator (a second run, a test) holds it: take a free port, say so loudly;
            # the address is in /healthz and <state_dir>/<run>/admin.address
            log.warning("admin port %d is taken; serving on a free port instead", cfg.admin_port)
            self.port = self._bind(cfg.admin_host, 0, creds)
        if not self.port:
            raise OSError(f"admin API could not bind {cfg.admin_host}")

    def _bind(self, host: str, port: int, creds: grpc.ServerCredentials | None) -> int:
        address = f"{host}:{port}"
        try:
            if creds is not None:
                return int(self.server.add_secure_port(address, creds))
            return int(self.server.add_insecure_port(address))
        except RuntimeError:  # grpcio raises where it used to return 0
            return 0

    async def start(self) -> None:
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("admin API on port %d (%s)", self.port, "TLS" if self.tls else "plaintext")

    async def stop(self, grace_s: float = 2.0) -> None:
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        for task in list(self.servicer.republishing):
            task.cancel()
