"""pytest fixtures on real servers: a nats-server and a PostgreSQL per test session.

Loaded by the repository's root conftest (`pytest_plugins = ["offbeat.testing"]`), so every
service's tests use the same servers the launcher starts. Nothing here fakes a component.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from offbeat.config import BusConfig
from offbeat.infra import NatsServer, PostgresServer

TEST_STREAM_BYTES = 256 * 1024 * 1024  # each run's stream reserves this much on the test server


@pytest.fixture(scope="session")
def infra_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("infra")


@pytest.fixture(scope="session")
def nats_server(infra_dir: Path) -> Iterator[NatsServer]:
    server = NatsServer.start(infra_dir, max_file_store_bytes=1024**4)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server(infra_dir: Path) -> Iterator[PostgresServer]:
    server = PostgresServer.start(infra_dir, durable=False)
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
def database_url(postgres_server: PostgresServer) -> str:
    from offbeat.ledger import upgrade

    upgrade(postgres_server.url)
    return postgres_server.url


@pytest.fixture
def fresh_database_url(postgres_server: PostgresServer) -> Iterator[str]:
    """An empty database of its own (no migrations applied), dropped afterwards."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = f"postgresql://postgres@{postgres_server.host}:{postgres_server.port}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+asyncpg://postgres@{postgres_server.host}:{postgres_server.port}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def run_id() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def bus_config(nats_url: str) -> BusConfig:
    return BusConfig(
        nats_url=nats_url,
        ack_wait_s=5.0,
        fetch_timeout_s=0.2,
        nak_backoff_s=[0.05, 0.1],
        stream_max_bytes=TEST_STREAM_BYTES,
    )


@pytest.fixture
async def bus(bus_config: BusConfig, run_id: str) -> AsyncIterator[object]:
    from offbeat.bus import Bus

    b = await Bus.connect(bus_config, run_id, name="test")
    await b.ensure()
    yield b
    with contextlib.suppress(Exception):
        await b.delete_streams()
    await b.close()


@pytest.fixture
async def ledger(database_url: str) -> AsyncIterator[object]:
    from offbeat.ledger import Ledger

    led = Ledger.connect(database_url)
    yield led
    await led.close()


async def wait_for(predicate, *, timeout_s: float = 10.0, interval_s: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    """Poll an (async or sync) predicate until true; fail with the timeout otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


@pytest.fixture
def service_config_file(tmp_path: Path) -> Path:
    """A run TOML for starting services in tests; services add their own sections with --set."""
    path = tmp_path / "run.toml"
    path.write_text(
        f'[run]\nstate_dir = "{tmp_path / "state"}"\n[bus]\nstream_max_bytes = {TEST_STREAM_BYTES}\n'
    )
    return path


def check_env_overrides(env: dict[str, str], where: str) -> None:
    """Every OFFBEAT__SECTION__FIELD variable names a real field and its value validates, as the
    services would read it (the run file's own values are not involved: an empty file)."""
    import importlib

    from offbeat.config import ConfigError, load_run_config

    models: dict[str, Any] = {
        name: getattr(importlib.import_module(f"offbeat_{name}.config"), f"{name.capitalize()}Config")
        for name in ("orchestrator", "inference", "scorer", "sandbox", "trainer")
    }
    models["launcher"] = importlib.import_module("offbeat.launcher").LauncherConfig
    overrides = {k: v for k, v in env.items() if k.startswith("OFFBEAT__")}
    try:
        run = load_run_config(None, environ=overrides)
        for section in (k.split("__")[1].lower() for k in overrides):
            if section in models:
                run.section(section, models[section])
            else:
                assert section in {"run", "bus", "ledger", "model"}, f"{where}: unknown section {section}"
    except ConfigError as exc:
        raise AssertionError(f"{where}: {exc}") from None
