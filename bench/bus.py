"""Bus throughput: offbeat's publish + consume path against raw nats-py on the same server.

offbeat: `Bus.publish_many` (JetStream, Nats-Msg-Id dedup headers) then `Bus.consume` (parse,
run-id check, handler, ack, metrics). Raw: nats-py `publish_async` + `publish_async_completed`,
then a pull subscription with `fetch(batch)` + `ack()`. Same payload (a serialized
RolloutRequest), same count, same server, alternated rounds; the figure is the median round.

Last line: {"offbeat_msgs_per_s", "raw_msgs_per_s", "ratio"}; goal ratio >= 0.8.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid

import nats
from nats.js import api

from offbeat.bus import Bus, Delivery, Publication
from offbeat.config import BusConfig
from offbeat.infra import NatsServer
from offbeat.v1 import rollout_pb2

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
ROUNDS = 3
BATCH = 500


def payload(run_id: str, i: int) -> rollout_pb2.RolloutRequest:
    return rollout_pb2.RolloutRequest(
        run_id=run_id,
        request_id=f"req-{i:08d}",
        group_id=f"g-{i:08d}",
        env="reasoning_gym:basic_arithmetic",
        prompt_key=f"k{i}",
        text="What is 17 + 25? Answer with a number." * 3,
        n=8,
        trajectory_ids=[f"t{i}-{j}" for j in range(2)],
    )


async def offbeat_round(url: str) -> float:
    run_id = f"b{uuid.uuid4().hex[:8]}"
    cfg = BusConfig(nats_url=url, fetch_batch=BATCH, fetch_timeout_s=0.2, stream_max_bytes=1024**3)
    bus = await Bus.connect(cfg, run_id, name="bench")
    await bus.ensure()
    msgs = [payload(run_id, i) for i in range(N)]
    got = 0
    stop = asyncio.Event()

    async def handle(req: rollout_pb2.RolloutRequest, delivery: Delivery) -> None:
        nonlocal got
        got += 1
        if got == N:
            stop.set()

    started = time.perf_counter()
    for i in range(0, N, 5000):
        await bus.publish_many(
            Publication(bus.subjects.rollout_request, m, f"req:{m.request_id}") for m in msgs[i : i + 5000]
        )
    await bus.consume("inference", rollout_pb2.RolloutRequest, handle, stop=stop)
    elapsed = time.perf_counter() - started
    await bus.delete_streams()
    await bus.close()
    return N / elapsed


async def raw_round(url: str) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    name = f"RAW{uuid.uuid4().hex[:8].upper()}"
    subject = f"raw.{name}.rollout.request"
    await js.add_stream(
        api.StreamConfig(
            name=name,
            subjects=[f"raw.{name}.>"],
            retention=api.RetentionPolicy.INTEREST,
            max_bytes=1024**3,
            duplicate_window=600,
        )
    )
    await js.add_consumer(
        name,
        api.ConsumerConfig(
            durable_name="c",
            ack_policy=api.AckPolicy.EXPLICIT,
            filter_subject=subject,
            max_ack_pending=4096,
            ack_wait=60,
        ),
    )
    data = [payload("raw", i).SerializeToString() for i in range(N)]
    started = time.perf_counter()
    for i, body in enumerate(data):
        await js.publish_async(subject, body, headers={"Nats-Msg-Id": f"req:{i}"})
    await js.publish_async_completed()
    sub = await js.pull_subscribe_bind(durable="c", stream=name)
    got = 0
    while got < N:
        for msg in await sub.fetch(BATCH, timeout=5):
            rollout_pb2.RolloutRequest.FromString(msg.data)
            await msg.ack()
            got += 1
    elapsed = time.perf_counter() - started
    await js.delete_stream(name)
    await nc.close()
    return N / elapsed


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer.start(tmp, max_file_store_bytes=64 * 1024**3)
        try:
            ours, raw = [], []
            for _ in range(ROUNDS):
                raw.append(await raw_round(server.url))
                ours.append(await offbeat_round(server.url))
        finally:
            server.stop()
    result = {
        "messages": N,
        "rounds": ROUNDS,
        "offbeat_msgs_per_s": round(statistics.median(ours)),
        "raw_msgs_per_s": round(statistics.median(raw)),
    }
    result["ratio"] = round(result["offbeat_msgs_per_s"] / result["raw_msgs_per_s"], 3)
    result["goal_ratio"] = 0.8
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
