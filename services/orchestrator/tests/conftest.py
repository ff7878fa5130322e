"""Fixtures of the orchestrator's tests: a running ledger writer and bus-message builders.

Everything talks to the real nats-server and PostgreSQL of `offbeat.testing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from offbeat_orchestrator.ledger_writer import LedgerWriter

from offbeat.config import LedgerConfig


@pytest.fixture
def ledger_config(database_url: str) -> LedgerConfig:
    return LedgerConfig(database_url=database_url, flush_interval_s=0.05, batch_size=500)


@pytest.fixture
async def writer(bus: Any, ledger: Any, ledger_config: LedgerConfig) -> AsyncIterator[LedgerWriter]:
    w = LedgerWriter(bus, ledger, ledger_config)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    yield w
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=30)


sys.path.insert(0, str(Path(__file__).parent))  # orch_helpers
