"""The admin gRPC API on a real grpc.aio server over real NATS + PostgreSQL: auth, rollback
errors, audit, paging, WatchEvents, health, and a client that knows the API only by reflection."""

import asyncio
import collections
import subprocess

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from offbeat_orchestrator.admin import AdminContext, AdminServer
from offbeat_orchestrator.config import OrchestratorConfig
from orch_helpers import completion, request, step, trajectory_rows, weights

from offbeat.testing import wait_for
from offbeat.v1 import admin_pb2, admin_pb2_grpc, policy_pb2

pytestmark = pytest.mark.integration
TOKEN = "s3cret-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"), ("x-offbeat-actor", "tester"))


def _context(bus, ledger, writer, run_id, *, cfg: OrchestratorConfig | None = None, **kw) -> AdminContext:  # type: ignore[no-untyped-def]
    return AdminContext(
        run_id=run_id,
        bus=bus,
        ledger=ledger,
        writer=writer,
        scheduler=None,
        cfg=cfg or OrchestratorConfig(admin_port=0),
        **kw,
    )


@pytest.fixture
async def admin(bus, ledger, writer, run_id):
    server = AdminServer(_context(bus, ledger, writer, run_id), TOKEN)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield admin_pb2_grpc.AdminServiceStub(channel), server
    await channel.close()
    await server.stop(0)


async def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def test_calls_without_or_with_a_wrong_token_are_unauthenticated(admin, ledger, run_id):
    stub, _ = admin
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        code, details = await _code(stub.GetStatus(admin_pb2.GetStatusRequest(), metadata=metadata))
        assert code == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert details and TOKEN not in details and "wrong" not in details
        code, _ = await _code(stub.Pause(admin_pb2.PauseRequest(), metadata=metadata))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    stream = stub.WatchEvents(admin_pb2.WatchEventsRequest(), metadata=(("authorization", "Bearer x"),))
    code, _ = await _code(stream.read())
    assert code == grpc.StatusCode.UNAUTHENTICATED
    audit = await ledger.admin_actions(run_id)
    assert [(a["action"], a["ok"], a["result"]) for a in audit] == [("pause", False, "UNAUTHENTICATED")] * 3
    assert all(TOKEN not in str(a) for a in audit)
    assert (await stub.GetStatus(admin_pb2.GetStatusRequest(), metadata=AUTH)).run_id == run_id


async def test_rollback_errors_and_success_are_audited(admin, bus, ledger, writer, run_id):
    stub, _ = admin
    s = bus.subjects
    req = request(run_id, "g", 3)
    events = [
        (s.policy_weights, weights(run_id, 0, 0, -1), "weights:0"),
        (s.policy_weights, weights(run_id, 1, 1, 0), "weights:1"),
        (s.policy_weights, weights(run_id, 2, 2, 1), "weights:2"),
        (s.rollout_request, req, "request:g:0"),
        (s.rollout_completion, completion(req, 0, versions=(0,)), "completion:g-0"),
        (s.rollout_completion, completion(req, 1, versions=(1, 2)), "completion:g-1"),
        (s.rollout_completion, completion(req, 2, versions=(2,)), "completion:g-2"),
        (s.trainer_step, step(run_id, 1, consumed=["g-0"], version=1), "step:1:g-0"),
        (s.trainer_step, step(run_id, 2, consumed=[], version=2), "step:2:"),
    ]
    for subject, message, msg_id in events:
        await bus.publish(subject, message, msg_id=msg_id)
    await wait_for(lambda: writer.committed_events >= len(events), timeout_s=60)
    controls = []
    sub = await bus.subscribe(s.control_all, policy_pb2.ControlCommand, lambda c: _append(controls, c))

    code, details = await _code(stub.Rollback(admin_pb2.RollbackRequest(version=7), metadata=AUTH))
    assert code == grpc.StatusCode.NOT_FOUND and "7" in details
    r = await stub.Rollback(admin_pb2.RollbackRequest(version=1, reason="bad step"), metadata=AUTH)
    assert (r.version, r.discarded_versions, r.discarded_trajectories) == (1, 1, 2)
    code, details = await _code(stub.Rollback(admin_pb2.RollbackRequest(version=2), metadata=AUTH))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "rolled back" in details

    rows = await trajectory_rows(ledger, run_id)
    assert {t: r["status"] for t, r in rows.items()} == {
        "g-0": "trained",
        "g-1": "discarded_rolled_back",
        "g-2": "discarded_rolled_back",
    }
    policies = (await stub.ListPolicies(admin_pb2.ListPoliciesRequest(), metadata=AUTH)).policies
    assert [(p.version, p.status) for p in policies] == [(0, "active"), (1, "active"), (2, "rolled_back")]
    await wait_for(lambda: len(controls) == 1, timeout_s=30)
    assert (controls[0].kind, controls[0].version) == (policy_pb2.CONTROL_KIND_ROLLBACK, 1)
    await sub.unsubscribe()

    await stub.Pause(admin_pb2.PauseRequest(reason="look"), metadata=AUTH)
    assert await bus.is_paused()
    status = await stub.GetStatus(admin_pb2.GetStatusRequest(), metadata=AUTH)
    assert status.paused and status.tokens_per_s > 0 and status.trajectories_per_s > 0
    assert dict(status.trajectories_by_status) == {"trained": 1, "discarded_rolled_back": 2}
    await stub.Resume(admin_pb2.ResumeRequest(), metadata=AUTH)
    assert not await bus.is_paused()
    audit = [(a["action"], a["ok"], a["args"].get("version")) for a in await ledger.admin_actions(run_id)]
    assert audit == [
        ("rollback", False, 7),
        ("rollback", True, 1),
        ("rollback", False, 2),
        ("pause", True, None),
        ("resume", True, None),
    ]
    assert all(a["actor"].startswith("tester@") for a in await ledger.admin_actions(run_id))


async def _append(items, item):
    items.append(item)


async def test_a_reason_or_actor_the_ledger_cannot_hold_is_refused_or_cut_and_always_audited(
    admin, bus, ledger, run_id
):
    stub, _ = admin
    for reason in ("stop\x00now", "x" * 5000):
        code, details = await _code(stub.Pause(admin_pb2.PauseRequest(reason=reason), metadata=AUTH))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "reason" in details
        code, _ = await _code(
            stub.Rollback(admin_pb2.RollbackRequest(version=1, reason=reason), metadata=AUTH)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert not await bus.is_paused()  # refused before anything was done

    long_actor = (("authorization", f"Bearer {TOKEN}"), ("x-offbeat-actor", "a" * 500))
    await stub.Pause(admin_pb2.PauseRequest(reason="ok"), metadata=long_actor)
    assert await bus.is_paused()
    await _code(stub.Resume(admin_pb2.ResumeRequest(), metadata=(("x-offbeat-actor", "b" * 500),)))

    audit = await ledger.admin_actions(run_id)
    assert [(a["action"], a["ok"]) for a in audit] == [
        ("pause", False),
        ("rollback", False),
        ("pause", False),
        ("rollback", False),
        ("pause", True),
        ("resume", False),
    ]
    assert all(a["result"].startswith("INVALID_ARGUMENT") for a in audit[:4])
    assert audit[-1]["result"] == "UNAUTHENTICATED"
    assert all(len(a["actor"]) <= 128 and "@" in a["actor"] for a in audit)
    assert "\x00" not in str(audit)


async def test_trajectories_page_and_staleness_and_watch_events(admin, bus, writer, run_id):
    stub, _ = admin
    watch = stub.WatchEvents(admin_pb2.WatchEventsRequest(kinds=["step"]), metadata=AUTH)
    req = request(run_id, "p", 5)
    await bus.publish(bus.subjects.rollout_request, req, msg_id="request:p:0")
    await bus.publish(
        bus.subjects.trainer_step, step(run_id, 1, consumed=["p-0", "p-1"], staleness=2), msg_id="step:1:p-0"
    )
    event = await asyncio.wait_for(watch.read(), timeout=60)
    assert (event.kind, event.fields["step"]) == ("step", "1")
    watch.cancel()

    await wait_for(lambda: writer.committed_events >= 2, timeout_s=60)
    ids, token = [], ""
    for _ in range(10):
        page = await stub.ListTrajectories(
            admin_pb2.ListTrajectoriesRequest(page_size=2, page_token=token), metadata=AUTH
        )
        assert len(page.trajectories) <= 2
        ids += [t.trajectory_id for t in page.trajectories]
        token = page.next_page_token
        if not token:
            break
    assert ids == [f"p-{i}" for i in range(5)]
    trained = await stub.ListTrajectories(admin_pb2.ListTrajectoriesRequest(status="trained"), metadata=AUTH)
    assert [(t.trajectory_id, t.consumed_step, t.staleness) for t in trained.trajectories] == [
        ("p-0", 1, 2),
        ("p-1", 1, 2),
    ]
    code, details = await _code(
        stub.ListTrajectories(admin_pb2.ListTrajectoriesRequest(status="nope"), metadata=AUTH)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "nope" in details
    st = await stub.GetStaleness(admin_pb2.GetStalenessRequest(), metadata=AUTH)
    assert ([(b.staleness, b.count) for b in st.buckets], st.p50, st.p95, st.max, st.count) == (
        [(2, 2)],
        2,
        2,
        2,
        2,
    )


class _Details(
    collections.namedtuple("_Details", "method timeout metadata credentials wait_for_ready compression"),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the token to every call of a sync channel (the reflection client's too)."""

    def _with_token(self, d):
        metadata = [*(d.metadata or []), *AUTH]
        return _Details(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


def _reflect_and_call(port: int) -> tuple[list[str], str, int]:
    """A generic client: only server reflection, a fresh DescriptorPool and dynamic classes."""
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    base = grpc.insecure_channel(f"127.0.0.1:{port}")
    channel = grpc.intercept_channel(base, _BearerToken())
    try:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)
        service = pool.FindServiceByName("offbeat.v1.AdminService")
        method = service.methods_by_name["GetStatus"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        response = call(request_cls(), timeout=30)
        return services, response.run_id, len(service.methods)
    finally:
        base.close()


async def test_a_reflection_only_client_lists_and_calls_the_service(admin, run_id):
    _, server = admin
    services, answered_run, methods = await asyncio.to_thread(_reflect_and_call, server.port)
    assert "offbeat.v1.AdminService" in services and "grpc.health.v1.Health" in services
    assert answered_run == run_id and methods == 8


async def test_a_body_that_does_not_parse_is_invalid_argument_after_authentication(admin):
    _, server = admin
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method, streaming in (("ListPolicies", False), ("Rollback", False), ("WatchEvents", True)):
            path = f"/offbeat.v1.AdminService/{method}"
            call = channel.unary_stream(path) if streaming else channel.unary_unary(path)
            for metadata, expected in (
                (AUTH, grpc.StatusCode.INVALID_ARGUMENT),
                ((), grpc.StatusCode.UNAUTHENTICATED),
            ):
                reply = call(b"\xff\xff", metadata=metadata, timeout=10)
                code, details = await _code(reply.read() if streaming else reply)
                assert code == expected, f"{method}: {code} {details}"
                assert details, f"{method}: {code} without a message"
                if expected == grpc.StatusCode.INVALID_ARGUMENT:
                    assert "malformed request body" in details


async def test_a_negative_page_size_is_invalid_argument(admin):
    stub, _ = admin
    code, details = await _code(
        stub.ListTrajectories(admin_pb2.ListTrajectoriesRequest(page_size=-1), metadata=AUTH)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in details, (code, details)


async def test_health_answers_serving_without_a_token(admin):
    _, server = admin
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "offbeat.v1.AdminService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_needs_the_token(admin):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, server = admin
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        code, _ = await _code(call.read())
        assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_tls_when_certificates_are_configured(bus, ledger, writer, run_id, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    cfg = OrchestratorConfig(admin_port=0, tls_cert_file=str(cert), tls_key_file=str(key))
    server = AdminServer(_context(bus, ledger, writer, run_id, cfg=cfg), TOKEN)
    await server.start()
    try:
        assert server.tls
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", creds) as channel:
            reply = await admin_pb2_grpc.AdminServiceStub(channel).GetStatus(
                admin_pb2.GetStatusRequest(), metadata=AUTH
            )
            assert reply.run_id == run_id
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            code, _ = await _code(
                admin_pb2_grpc.AdminServiceStub(channel).GetStatus(
                    admin_pb2.GetStatusRequest(), metadata=AUTH, timeout=10
                )
            )
            assert code == grpc.StatusCode.UNAVAILABLE, "a plaintext client was answered by a TLS server"
    finally:
        await server.stop(0)


async def test_a_taken_admin_port_falls_back_to_a_free_one(admin, bus, ledger, writer, run_id):
    _, first = admin
    ctx = _context(bus, ledger, writer, run_id, cfg=OrchestratorConfig(admin_port=first.port))
    second = AdminServer(ctx, TOKEN)
    await second.start()
    try:
        assert second.port and second.port != first.port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            reply = await admin_pb2_grpc.AdminServiceStub(channel).GetStatus(
                admin_pb2.GetStatusRequest(), metadata=AUTH
            )
            assert reply.run_id == run_id
    finally:
        await second.stop(0)


async def test_rollback_past_the_trainers_window_is_refused_before_anything_changes(
    bus, ledger, writer, run_id
):
    s = bus.subjects
    for v in range(4):
        await bus.publish(s.policy_weights, weights(run_id, v, v, v - 1), msg_id=f"weights:{v}")
    await wait_for(lambda: writer.committed_events >= 4, timeout_s=60)
    ctx = _context(bus, ledger, writer, run_id, rollback_window=2)
    server = AdminServer(ctx, TOKEN)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            code, details = await _code(stub.Rollback(admin_pb2.RollbackRequest(version=1), metadata=AUTH))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "rollback_window" in details
            policies = (await stub.ListPolicies(admin_pb2.ListPoliciesRequest(), metadata=AUTH)).policies
            assert {p.status for p in policies} == {"active"}
            reply = await stub.Rollback(admin_pb2.RollbackRequest(version=2), metadata=AUTH)
            assert (reply.version, reply.discarded_versions) == (2, 1)
    finally:
        await server.stop(0)
    audit = [(a["action"], a["ok"]) for a in await ledger.admin_actions(run_id)]
    assert audit == [("rollback", False), ("rollback", True)]


async def test_an_audit_the_ledger_refuses_does_not_fail_the_action_it_records(
    admin, bus, ledger, monkeypatch, caplog
):
    stub, _ = admin

    async def refuse(*args, **kwargs):
        raise RuntimeError("ledger down")

    monkeypatch.setattr(ledger, "audit", refuse)
    await stub.Pause(admin_pb2.PauseRequest(reason="maintenance"), metadata=AUTH)
    assert await bus.is_paused()
    assert (
        "admin action not recorded in the ledger (RuntimeError: ledger down): pause by tester@" in caplog.text
    )
    assert TOKEN not in caplog.text


async def test_a_rollback_whose_control_publish_fails_is_published_again_until_it_goes_through(
    admin, bus, ledger, writer, run_id, monkeypatch
):
    stub, _ = admin
    s = bus.subjects
    for version in (0, 1, 2):
        await bus.publish(
            s.policy_weights, weights(run_id, version, version, version - 1), msg_id=f"w:{version}"
        )
    await wait_for(lambda: writer.committed_events >= 3, timeout_s=60)
    controls = []
    sub = await bus.subscribe(s.control_all, policy_pb2.ControlCommand, lambda c: _append(controls, c))
    publish, failures = bus.control, []

    async def flaky(*args, **kwargs):
        if len(failures) < 2:
            failures.append(kwargs["command_id"])
            raise TimeoutError("nats: timeout")
        await publish(*args, **kwargs)

    monkeypatch.setattr(bus, "control", flaky)
    code, details = await _code(stub.Rollback(admin_pb2.RollbackRequest(version=1), metadata=AUTH))
    assert (
        code == grpc.StatusCode.UNAVAILABLE and "ledger rolled back to 1" in details and "retrying" in details
    )
    await wait_for(lambda: len(controls) == 1, timeout_s=30)
    assert (controls[0].kind, controls[0].version, controls[0].command_id) == (
        policy_pb2.CONTROL_KIND_ROLLBACK,
        1,
        failures[0],
    )
    await wait_for(lambda: _audited(ledger, run_id, 2), timeout_s=10)
    audit = [(a["action"], a["ok"], a["args"]["command_id"]) for a in await ledger.admin_actions(run_id)]
    assert audit == [("rollback", False, failures[0]), ("rollback", True, failures[0])]
    await sub.unsubscribe()


async def _audited(ledger, run_id, n):
    return len(await ledger.admin_actions(run_id)) >= n
