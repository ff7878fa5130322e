import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from offbeat.bus import Bus, Delivery, Outcome, Publication, Received, Reject
from offbeat.config import BusConfig
from offbeat.jetstream import EXPIRY_GRACE_S, Puller
from offbeat.testing import wait_for
from offbeat.v1 import policy_pb2, rollout_pb2

pytestmark = pytest.mark.integration
HERE = Path(__file__).parent


def _request(run_id: str, i: int) -> rollout_pb2.RolloutRequest:
    return rollout_pb2.RolloutRequest(
        run_id=run_id,
        request_id=f"req-{i}",
        group_id=f"g-{i}",
        env="math",
        text=f"What is {i}+1?",
        n=1,
        trajectory_ids=[f"tr-{i}"],
    )


async def _dead_letters(bus: Bus, n: int, timeout_s: float = 15.0) -> list[policy_pb2.DeadLetter]:
    letters: list[policy_pb2.DeadLetter] = []
    sub = await bus.js.subscribe(bus.subjects.dlq, ordered_consumer=True)
    deadline = time.monotonic() + timeout_s
    while len(letters) < n and time.monotonic() < deadline:
        try:
            msg = await sub.next_msg(timeout=0.5)
        except TimeoutError:
            continue
        letters.append(policy_pb2.DeadLetter.FromString(msg.data))
    await sub.unsubscribe()
    return letters


async def test_publish_is_deduplicated_by_msg_id(bus: Bus, run_id):
    first = await bus.publish(bus.subjects.rollout_request, _request(run_id, 1), msg_id="req-1")
    second = await bus.publish(bus.subjects.rollout_request, _request(run_id, 1), msg_id="req-1")
    assert not first.duplicate and second.duplicate
    assert await bus.consumer_pending("inference") == (1, 0)


async def test_a_dead_letter_that_cannot_be_published_leaves_the_consumer_running(
    bus: Bus, run_id, monkeypatch
):
    # the publish of the letter timed out once (then was refused whole): the exception used to end
    # the consume loop, leaving every later message unhandled
    await bus.js.publish(bus.subjects.rollout_request, b"\xff garbage", headers={"Nats-Msg-Id": "bad-1"})
    await bus.publish(bus.subjects.rollout_request, _request(run_id, 1), msg_id="good")
    publish, tries = bus.publish, []

    async def flaky(subject, message, **kwargs):  # type: ignore[no-untyped-def]
        if subject == bus.subjects.dlq:
            tries.append(len(message.payload))
            if len(tries) <= 2:
                raise TimeoutError("nats: timeout")
        return await publish(subject, message, **kwargs)

    monkeypatch.setattr(bus, "publish", flaky)
    handled: list[str] = []
    stop = asyncio.Event()

    async def handle(req: rollout_pb2.RolloutRequest, delivery: Delivery) -> None:
        handled.append(req.request_id)

    task = asyncio.create_task(bus.consume("inference", rollout_pb2.RolloutRequest, handle, stop=stop))
    [letter] = await _dead_letters(bus, 1, timeout_s=30)
    await wait_for(lambda: "req-1" in handled)
    stop.set()
    await task
    assert tries[:2] == [len(b"\xff garbage"), 0], "the second try goes without the payload"
    assert letter.msg_id == "bad-1" and "malformed RolloutRequest" in letter.reason
    assert await bus.consumer_pending("inference") == (0, 0)


@pytest.mark.slow
async def test_sigkilled_consumer_loses_nothing(bus: Bus, run_id, postgres_server, tmp_path):
    dsn = postgres_server.dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS handled (run_id text, request_id text, deliveries int DEFAULT 1, "
            "PRIMARY KEY (run_id, request_id))"
        )
    total = 10_000
    for start in range(0, total, 1000):
        await bus.publish_many(
            Publication(bus.subjects.rollout_request, _request(run_id, i), f"req-{i}")
            for i in range(start, start + 1000)
        )

    def distinct() -> int:
        with psycopg.connect(dsn) as conn:
            return int(conn.execute("SELECT count(*) FROM handled WHERE run_id=%s", (run_id,)).fetchone()[0])

    cmd = [sys.executable, str(HERE / "bus_consumer_proc.py"), bus.cfg.nats_url, run_id, dsn]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen(cmd, env=env)
    await wait_for(lambda: distinct() >= 3000, timeout_s=60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = distinct()
    assert killed_at < total, "consumer finished before it could be killed"
    proc = subprocess.Popen(cmd, env=env)
    try:
        await wait_for(lambda: distinct() == total, timeout_s=120)
        await wait_for(_drained(bus), timeout_s=30)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert distinct() == total


def _drained(bus: Bus):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return await bus.consumer_pending("inference") == (0, 0)

    return check


async def test_malformed_and_failing_messages_are_dead_lettered_and_consumption_continues(bus: Bus, run_id):
    await bus.js.publish(
        bus.subjects.rollout_request, b"\xff\xff\xff garbage", headers={"Nats-Msg-Id": "bad-1"}
    )
    await bus.publish(bus.subjects.rollout_request, _request(run_id, 1), msg_id="poison")
    await bus.publish(bus.subjects.rollout_request, _request("another-run", 2), msg_id="foreign")
    await bus.publish(bus.subjects.rollout_request, _request(run_id, 3), msg_id="good")
    handled: list[str] = []
    stop = asyncio.Event()

    async def handle(req: rollout_pb2.RolloutRequest, delivery: Delivery) -> None:
        if req.request_id == "req-1":
            raise RuntimeError("always fails")
        handled.append(req.request_id)

    task = asyncio.create_task(bus.consume("inference", rollout_pb2.RolloutRequest, handle, stop=stop))
    letters = await _dead_letters(bus, 3)
    await wait_for(lambda: "req-3" in handled)
    stop.set()
    await task
    reasons = {letter.msg_id: letter.reason for letter in letters}
    assert "malformed RolloutRequest" in reasons["bad-1"]
    assert "failed 5 times" in reasons["poison"] and "always fails" in reasons["poison"]
    assert "another-run" in reasons["foreign"]
    assert letters[0].payload.startswith(b"\xff\xff\xff")
    assert handled == ["req-3"]
    assert await bus.consumer_pending("inference") == (0, 0)


async def test_a_message_whose_consumer_dies_holding_it_every_time_is_dead_lettered(
    bus_config: BusConfig, run_id: str
):
    """The server stops delivering a message after `max_deliver` deliveries that were never
    answered (the consumer's process died each time; the handler never got to fail) and only says
    so in an advisory: without `dead_letter_undelivered` it would be neither handled nor dead."""
    cfg = bus_config.model_copy(update={"ack_wait_s": 1.0, "max_deliver": 2})
    async with await Bus.connect(cfg, f"{run_id}-poison", name="test") as b:
        await b.ensure()
        try:
            stop = asyncio.Event()
            undelivered = asyncio.create_task(b.dead_letter_undelivered(stop=stop))
            poison = _request(b.run_id, 1)
            await b.publish(b.subjects.rollout_request, poison, msg_id="request:req-1:0")
            await b.publish(b.subjects.rollout_request, _request(b.run_id, 2), msg_id="request:req-2:0")
            sub = await b.js.pull_subscribe_bind("inference", b.subjects.stream)
            deliveries = 0
            while deliveries < 2:  # a consumer that takes it and dies (never acks, never fails)
                for msg in await sub.fetch(2, timeout=5):
                    if msg.data == poison.SerializeToString():
                        deliveries += 1
                    else:
                        await msg.ack()
            with pytest.raises(TimeoutError):  # the server looks at it again when asked for more
                await sub.fetch(1, timeout=3)
            letters = await _dead_letters(b, 1, timeout_s=30)
            stop.set()
            await undelivered
            (letter,) = letters
            assert (letter.consumer, letter.deliveries, letter.msg_id) == ("inference", 2, "request:req-1:0")
            assert letter.subject == b.subjects.rollout_request
            assert rollout_pb2.RolloutRequest.FromString(letter.payload) == poison
            assert "never acked" in letter.reason and "died or hung" in letter.reason
            assert await b.consumer_pending("inference") == (0, 0)
            assert await b.consumer_pending("undelivered") == (0, 0)
        finally:
            await b.delete_streams()


async def test_a_consumer_without_a_delivery_limit_retries_a_failing_handler_until_it_succeeds(
    bus_config: BusConfig, run_id: str
):
    """`max_deliver = -1` (the advisory consumer's): a handler that fails more often than the
    default limit is retried, never dead-lettered, so what it reads is never dropped."""
    from offbeat.bus import ConsumerSpec

    async with await Bus.connect(bus_config, f"{run_id}-nolimit", name="test") as b:
        b.consumers["retry"] = ConsumerSpec(
            durable="retry",
            filter_subject=b.subjects.rollout_request,
            ack_wait_s=5.0,
            max_deliver=-1,
            max_ack_pending=16,
            description="test",
        )
        await b.ensure()
        try:
            await b.publish(b.subjects.rollout_request, _request(b.run_id, 1), msg_id="r1")
            attempts: list[int] = []
            stop = asyncio.Event()

            async def handle(req: rollout_pb2.RolloutRequest, delivery: Delivery) -> None:
                attempts.append(delivery.num_delivered)
                if len(attempts) <= b.cfg.max_deliver + 2:
                    raise RuntimeError("not yet")
                stop.set()

            await asyncio.wait_for(b.consume("retry", rollout_pb2.RolloutRequest, handle, stop=stop), 60)
            assert attempts == list(range(1, b.cfg.max_deliver + 4))
            info = await b.js.stream_info(b.subjects.stream, subjects_filter=b.subjects.dlq)
            assert not info.state.subjects, "dead-lettered"
            assert await b.consumer_pending("retry") == (0, 0)
        finally:
            await b.delete_streams()


async def test_a_batch_dead_letters_its_bad_messages_alone_and_acks_the_rest(bus: Bus, run_id):
    """One pull holds good messages, garbage, another run's message, one the handler rejects and
    one it fails on: the bad ones are dead-lettered each with its own reason, the good ones acked
    once, and the failed one is not acked but redelivered (and handled the second time)."""
    await bus.publish(bus.subjects.rollout_request, _request(run_id, 1), msg_id="good-1")
    await bus.js.publish(bus.subjects.rollout_request, b"\xff\xff\xff junk", headers={"Nats-Msg-Id": "bad"})
    await bus.publish(bus.subjects.rollout_request, _request("another-run", 2), msg_id="foreign")
    await bus.publish(bus.subjects.rollout_request, _request(run_id, 3), msg_id="rejected")
    await bus.publish(bus.subjects.rollout_request, _request(run_id, 4), msg_id="flaky")
    await bus.publish(bus.subjects.rollout_request, _request(run_id, 5), msg_id="good-5")
    batches: list[list[tuple[str, int]]] = []
    handled: list[str] = []
    stop = asyncio.Event()

    async def handle(batch: list[Received[rollout_pb2.RolloutRequest]]) -> list[Outcome]:
        batches.append([(r.message.request_id, r.delivery.num_delivered) for r in batch])
        outcomes: list[Outcome] = []
        for r in batch:
            if r.message.request_id == "req-3":
                outcomes.append(Reject("no such environment"))
            elif r.message.request_id == "req-4" and r.delivery.num_delivered == 1:
                outcomes.append(RuntimeError("sandbox flaked"))
            else:
                handled.append(r.message.request_id)
                outcomes.append(None)
        return outcomes

    task = asyncio.create_task(
        bus.consume_batches("inference", rollout_pb2.RolloutRequest, handle, stop=stop)
    )
    letters = await _dead_letters(bus, 3)
    await wait_for(lambda: "req-4" in handled)
    await wait_for(_drained(bus), timeout_s=15)
    stop.set()
    await task
    assert batches[0] == [("req-1", 1), ("req-3", 1), ("req-4", 1), ("req-5", 1)], (
        "the bad messages were not taken out of the batch, or the batch was split"
    )
    assert ("req-4", 2) in [m for b in batches[1:] for m in b], "the failed message was not redelivered"
    assert sorted(handled) == ["req-1", "req-4", "req-5"], "a message was handled twice or not at all"
    reasons = {letter.msg_id: letter.reason for letter in letters}
    assert set(reasons) == {"bad", "foreign", "rejected"}
    assert reasons["bad"].startswith("malformed RolloutRequest")
    assert "another-run" in reasons["foreign"]
    assert reasons["rejected"] == "no such environment"
    assert all(letter.consumer == "inference" and letter.deliveries == 1 for letter in letters)


async def test_a_batch_handler_that_raises_acks_nothing(bus: Bus, run_id):
    """A handler that raises fails its whole batch: every message comes back, none was acked."""
    for i in range(3):
        await bus.publish(bus.subjects.rollout_request, _request(run_id, i), msg_id=f"m-{i}")
    seen: list[tuple[str, int]] = []
    stop = asyncio.Event()

    async def handle(batch: list[Received[rollout_pb2.RolloutRequest]]) -> None:
        seen.extend((r.message.request_id, r.delivery.num_delivered) for r in batch)
        if batch[0].delivery.num_delivered == 1:
            raise ConnectionError("database away")

    task = asyncio.create_task(
        bus.consume_batches("inference", rollout_pb2.RolloutRequest, handle, stop=stop, max_in_flight=8)
    )
    await wait_for(lambda: len(seen) >= 6, timeout_s=15)
    await wait_for(_drained(bus), timeout_s=15)
    stop.set()
    await task
    assert sorted(seen) == sorted((f"req-{i}", n) for i in range(3) for n in (1, 2)), seen


async def test_a_busy_consumer_does_not_give_up_a_pull_whose_messages_it_has_not_read(bus: Bus, run_id):
    """A client too busy to read its socket sees a pull request pass its expiry while the request's
    messages (and its end) wait unread; giving the request up then and asking again would count
    those messages against the new request, and more than the room would arrive."""
    for i in range(2):
        await bus.publish(bus.subjects.rollout_request, _request(run_id, i), msg_id=f"m-{i}")
    puller = await Puller(bus.nc, bus.subjects.stream, "inference", depth=1).start()
    try:
        await puller._ask(4, 0.2)
        time.sleep(0.2 + EXPIRY_GRACE_S + 0.3)  # the busy client: the loop reads nothing meanwhile
        got = await puller.fetch(4, 0.2, size=256)
        assert [m.headers["Nats-Msg-Id"] for m in got] == ["m-0", "m-1"]
        assert puller._next_rid == 1, "the expired request was given up and another one sent"
        await wait_for(lambda: not puller.requests, timeout_s=5)  # its end (408) comes in after them
    finally:
        await puller.close()


async def test_longest_rollout_crosses_the_bus(bus: Bus, run_id):
    n = 65_536
    completion = rollout_pb2.RolloutCompletion(
        run_id=run_id,
        trajectory_id="long",
        prompt_token_ids=list(range(1024)),
        completion_token_ids=[(i * 7919) % 151_000 for i in range(n)],
        logprobs=[-(i % 97) / 10.0 for i in range(n)],
        version_spans=[
            rollout_pb2.VersionSpan(version=3, start=0, end=40_000),
            rollout_pb2.VersionSpan(version=4, start=40_000, end=n),
        ],
    )
    assert completion.ByteSize() > 400 * 1024
    assert bus.nc.max_payload >= bus.cfg.max_payload_bytes  # server configured by offbeat.infra
    await bus.publish(bus.subjects.rollout_completion, completion, msg_id="long")
    got: list[rollout_pb2.RolloutCompletion] = []
    stop = asyncio.Event()

    async def handle(c: rollout_pb2.RolloutCompletion, delivery: Delivery) -> None:
        got.append(c)
        stop.set()

    await asyncio.wait_for(bus.consume("scorer", rollout_pb2.RolloutCompletion, handle, stop=stop), 30)
    assert got[0] == completion


async def test_head_and_pause_state_live_in_kv(bus: Bus, run_id):
    assert await bus.get_head() is None
    head = policy_pb2.WeightVersion(run_id=run_id, version=3, step=3, parent=2, uri="file:///w", sha256="ab")
    await bus.put_head(head)
    assert await bus.get_head() == head
    await bus.control(policy_pb2.CONTROL_KIND_PAUSE, command_id="c1")
    assert await bus.is_paused()
    await bus.control(policy_pb2.CONTROL_KIND_RESUME, command_id="c2")
    assert not await bus.is_paused()


async def test_request_reply(bus: Bus):
    from offbeat.v1 import sandbox_pb2

    async def echo(req: sandbox_pb2.SandboxExecRequest) -> sandbox_pb2.SandboxExecResult:
        return sandbox_pb2.SandboxExecResult(request_id=req.request_id, stdout=req.code.encode())

    subject = f"test-echo.{bus.run_id}"  # outside the run stream, which would ack it too
    await bus.serve(
        subject,
        sandbox_pb2.SandboxExecRequest,
        echo,
        queue="q",
        on_malformed=lambda r: sandbox_pb2.SandboxExecResult(error=r),
    )
    reply = await bus.request(
        subject,
        sandbox_pb2.SandboxExecRequest(request_id="r", code="hi"),
        sandbox_pb2.SandboxExecResult,
        timeout_s=5,
    )
    assert reply.stdout == b"hi"
    raw = await bus.nc.request(subject, b"\xff\xff", timeout=5)
    assert "malformed" in sandbox_pb2.SandboxExecResult.FromString(raw.data).error


async def test_stream_declares_every_limit(bus: Bus):
    info = await bus.js.stream_info(bus.subjects.stream)
    assert info.config.max_msg_size == bus.cfg.max_payload_bytes
    assert info.config.duplicate_window == pytest.approx(bus.cfg.duplicate_window_s)
    for name in bus.consumers:
        c = (await bus.js.consumer_info(bus.stream_of(name), name)).config
        assert c.ack_wait and c.max_deliver and c.max_ack_pending, name


def test_config_payload_limit_fits_longest_rollout():
    assert BusConfig().max_payload_bytes >= 65_536 * 9


async def test_a_stream_that_does_not_fit_the_server_names_the_setting(tmp_path: Path, run_id: str) -> None:
    from offbeat.bus import BusConfigError
    from offbeat.infra import NatsServer

    server = NatsServer.start(tmp_path / "small", max_file_store_bytes=64 * 1024**2)
    try:
        cfg = BusConfig(nats_url=server.url, stream_max_bytes=256 * 1024**2)
        bus = await Bus.connect(cfg, run_id, name="test")
        try:
            with pytest.raises(BusConfigError, match="stream_max_bytes"):
                await bus.ensure()
            small = await Bus.connect(
                cfg.model_copy(update={"stream_max_bytes": 16 * 1024**2}), run_id, name="t"
            )
            await small.ensure()  # the same run fits once the reservation does
            await small.close()
        finally:
            await bus.close()
    finally:
        server.stop()
