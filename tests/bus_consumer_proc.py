"""A consumer process for the kill test: records each rollout request it handles in PostgreSQL.

Handling is idempotent (INSERT ... ON CONFLICT), so redeliveries after a SIGKILL are absorbed and
counted. Usage: python bus_consumer_proc.py NATS_URL RUN_ID DSN
"""

import asyncio
import sys

import psycopg

from offbeat.bus import Bus, Delivery
from offbeat.config import BusConfig
from offbeat.v1 import rollout_pb2


async def main(nats_url: str, run_id: str, dsn: str) -> None:
    bus = await Bus.connect(
        BusConfig(nats_url=nats_url, ack_wait_s=2.0, fetch_timeout_s=0.2, stream_max_bytes=256 * 1024 * 1024),
        run_id,
        name="killme",
    )
    await bus.ensure()
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    stop = asyncio.Event()

    async def handle(req: rollout_pb2.RolloutRequest, delivery: Delivery) -> None:
        await conn.execute(
            "INSERT INTO handled (run_id, request_id) VALUES (%s, %s) "
            "ON CONFLICT (run_id, request_id) DO UPDATE SET deliveries = handled.deliveries + 1",
            (run_id, req.request_id),
        )

    await bus.consume("inference", rollout_pb2.RolloutRequest, handle, stop=stop, batch=100)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
