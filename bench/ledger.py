"""Ledger write throughput: the orchestrator's ledger writer against raw batched upserts.

Events: for N trajectories, a completion and a scored event each (2N trajectory events), published
on the run's bus before timing starts. offbeat: `LedgerWriter` consumes them from the `ledger`
durable consumer, maps them to rows, writes batches in one transaction each and acks after
commit; its database connection is made before the clock starts, as the baseline's is.
Baseline: the same rows (mapped in advance, untimed) written with asyncpg `executemany` of a plain
`INSERT ... ON CONFLICT DO UPDATE` in batches of the same size, on the same server. Alternated
rounds (5); medians; the ratio is the median of each round's own ratio, so a slow spell of the
shared machine weighs on both sides of the rounds it falls in.

Last line: {"writer_events_per_s", "raw_events_per_s", "ratio"}; goals ratio >= 0.8 and
writer_events_per_s >= 5,000.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
import uuid

import asyncpg
from offbeat_orchestrator.events import completion_rows, scored_rows
from offbeat_orchestrator.ledger_writer import LedgerWriter

from offbeat.bus import Bus, Publication
from offbeat.config import BusConfig, LedgerConfig
from offbeat.infra import NatsServer, PostgresServer
from offbeat.ledger import Ledger, upgrade
from offbeat.v1 import rollout_pb2

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
ROUNDS = 5
BATCH = 1000


def events(run_id: str) -> list[Publication]:
    out: list[Publication] = []
    now = time.time()
    for i in range(N):
        c = rollout_pb2.RolloutCompletion(
            run_id=run_id,
            trajectory_id=f"t{i:07d}",
            request_id=f"r{i // 8}",
            group_id=f"g{i // 8}",
            env="reasoning_gym:basic_arithmetic",
            prompt_key=f"k{i // 8}",
            sample_index=i % 8,
            group_size=8,
            prompt_token_ids=list(range(40)),
            completion_token_ids=list(range(8)),
            logprobs=[-0.5] * 8,
            version_spans=[rollout_pb2.VersionSpan(version=1, start=0, end=8)],
            finished_at=now,
        )
        s = rollout_pb2.ScoredTrajectory(
            completion=c, reward=1.0, status=rollout_pb2.REWARD_STATUS_OK, scored_at=now
        )
        out.append(Publication(f"offbeat.{run_id}.rollout.completion", c, f"completion:{c.trajectory_id}"))
        out.append(Publication(f"offbeat.{run_id}.rollout.scored", s, f"scored:{c.trajectory_id}"))
    return out


RAW_SQL = """
INSERT INTO trajectories (run_id, trajectory_id, group_id, request_id, env, prompt_key, sample_index, eval,
  status, prompt_tokens, completion_tokens, first_version, last_version, generated_at, reward, reward_status,
  reason, scored_at)
VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18)
ON CONFLICT (run_id, trajectory_id) DO UPDATE SET
  status = CASE WHEN offbeat_status_rank(excluded.status) > offbeat_status_rank(trajectories.status)
                 AND offbeat_status_rank(trajectories.status) < 3 THEN excluded.status ELSE trajectories.status END,
  reward = COALESCE(excluded.reward, trajectories.reward),
  reward_status = COALESCE(excluded.reward_status, trajectories.reward_status),
  reason = COALESCE(excluded.reason, trajectories.reason),
  scored_at = COALESCE(excluded.scored_at, trajectories.scored_at),
  completion_tokens = COALESCE(excluded.completion_tokens, trajectories.completion_tokens),
  generated_at = COALESCE(excluded.generated_at, trajectories.generated_at)
"""
COLS = [
    "run_id",
    "trajectory_id",
    "group_id",
    "request_id",
    "env",
    "prompt_key",
    "sample_index",
    "eval",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "first_version",
    "last_version",
    "generated_at",
    "reward",
    "reward_status",
    "reason",
    "scored_at",
]


async def writer_round(nats_url: str, db_url: str) -> float:
    run_id = f"lb{uuid.uuid4().hex[:8]}"
    bus = await Bus.connect(
        BusConfig(nats_url=nats_url, fetch_timeout_s=0.2, stream_max_bytes=1024**3),
        run_id,
        name="bench-ledger",
    )
    await bus.ensure()
    pubs = events(run_id)
    for i in range(0, len(pubs), 5000):
        await bus.publish_many(pubs[i : i + 5000])
    total = len(pubs)
    del pubs  # the bench's own copy of the events is no part of the writer's heap
    ledger = Ledger.connect(db_url)
    await ledger.count_trajectories(run_id)  # connected before the clock starts, as the baseline is
    writer = LedgerWriter(
        bus, ledger, LedgerConfig(database_url=db_url, batch_size=BATCH, flush_interval_s=0.2)
    )
    stop = asyncio.Event()
    gc.collect()  # both rounds start with the bench's garbage collected
    started = time.perf_counter()
    task = asyncio.create_task(writer.run(stop))
    while writer.committed_events < total:  # noqa: ASYNC110 (polling a counter, not an event)
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    assert await ledger.count_trajectories(run_id) == N
    await ledger.close()
    await bus.delete_streams()
    await bus.close()
    return total / elapsed


async def raw_round(dsn: str) -> float:
    run_id = f"lr{uuid.uuid4().hex[:8]}"
    rows = []
    for pub in events(run_id):
        m = pub.message
        r = (
            completion_rows(run_id, m)
            if isinstance(m, rollout_pb2.RolloutCompletion)
            else scored_rows(run_id, m)
        )
        rows.extend(tuple(t.get(c) for c in COLS) for t in r.trajectories)
    conn = await asyncpg.connect(dsn)
    gc.collect()
    started = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        async with conn.transaction():
            await conn.executemany(RAW_SQL, rows[i : i + BATCH])
    elapsed = time.perf_counter() - started
    await conn.close()
    return len(rows) / elapsed


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        nats_server = NatsServer.start(tmp, max_file_store_bytes=64 * 1024**3)
        pg = PostgresServer.start(tmp, durable=True)
        try:
            await asyncio.to_thread(upgrade, pg.url)
            writer, raw = [], []
            for i in range(ROUNDS):
                raw.append(await raw_round(pg.dsn))
                writer.append(await writer_round(nats_server.url, pg.url))
                print(f"round {i}: writer {writer[-1]:.0f}/s, raw {raw[-1]:.0f}/s", flush=True)
        finally:
            nats_server.stop()
            pg.destroy()
    result = {
        "events": 2 * N,
        "rounds": ROUNDS,
        "writer_events_per_s": round(statistics.median(writer)),
        "raw_events_per_s": round(statistics.median(raw)),
    }
    result["ratio"] = round(statistics.median(w / r for w, r in zip(writer, raw, strict=True)), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
