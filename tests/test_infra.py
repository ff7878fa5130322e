"""The embedded servers (offbeat.infra) on real processes: ports taken by others, stale records,
ownership, payload limits."""

import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import psycopg
import pytest

from offbeat.bus import Bus, BusConfigError
from offbeat.cli import main as cli_main
from offbeat.config import BusConfig
from offbeat.infra import (
    PASSWORD_FILE,
    STATE_FILE,
    Infra,
    InfraError,
    NatsServer,
    PostgresServer,
    free_port,
)
from offbeat.ledger import Ledger, upgrade

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


def nats_info(port: int) -> dict[str, object]:
    """The INFO a nats-server sends first on 127.0.0.1:port."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        line = s.makefile("rb").readline()
    assert line.startswith(b"INFO "), line
    return json.loads(line[5:])  # type: ignore[no-any-return]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A state directory whose servers are stopped (and PostgreSQL's data removed) afterwards."""
    state = tmp_path / "infra"
    yield state
    infra = Infra.load(state)
    if infra is not None:
        infra.nats.stop()
        infra.postgres.destroy()


@pytest.fixture
def squatter() -> Iterator[socket.socket]:
    """A listening socket on a free loopback port that never speaks NATS."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def test_nats_on_a_taken_fixed_port_fails_clearly(tmp_path: Path, squatter: socket.socket) -> None:
    port = squatter.getsockname()[1]
    with pytest.raises(InfraError, match=f"127.0.0.1:{port} is in use"):
        server = NatsServer.start(tmp_path, port=port, timeout_s=5)
        server.stop()


def test_a_recorded_port_taken_by_another_process_moves_to_a_free_one(
    state: Path, squatter: socket.socket
) -> None:
    first = Infra.up(state, durable=False)
    first.down()
    taken = squatter.getsockname()[1]
    record = json.loads((state / STATE_FILE).read_text())
    record["nats"]["port"] = taken
    (state / STATE_FILE).write_text(json.dumps(record))

    infra = Infra.up(state, durable=False)
    assert infra.nats.port != taken
    assert nats_info(infra.nats.port)["port"] == infra.nats.port
    assert Infra.load(state).nats.port == infra.nats.port  # type: ignore[union-attr]


def test_half_alive_infra_restarts_only_the_dead_server(state: Path) -> None:
    first = Infra.up(state, durable=False)
    first.postgres.stop()

    again = Infra.up(state, durable=False)
    assert again.nats.pid == first.nats.pid
    assert again.started_here == {"postgres"}
    loaded = Infra.load(state)
    assert loaded is not None
    assert loaded.status()["nats_running"] and loaded.status()["postgres_running"]
    loaded.down()
    assert not alive(first.nats.pid)
    assert not loaded.postgres.running()


def test_stale_pids_are_neither_trusted_nor_signalled(state: Path, sleeper: subprocess.Popen[bytes]) -> None:
    infra = Infra.up(state, durable=False)
    infra.nats.stop()
    pid_file = Path(infra.postgres.data_dir) / "postmaster.pid"
    lines = pid_file.read_text().splitlines()
    os.kill(int(lines[0]), signal.SIGKILL)  # a crash (or reboot): postmaster.pid stays
    deadline = time.monotonic() + 10
    while alive(int(lines[0])):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # and the recorded pids now belong to someone else
    pid_file.write_text("\n".join([str(sleeper.pid), *lines[1:]]) + "\n")
    record = json.loads((state / STATE_FILE).read_text())
    record["nats"]["pid"] = sleeper.pid
    (state / STATE_FILE).write_text(json.dumps(record))

    stale = Infra.load(state)
    assert stale is not None
    assert stale.status()["nats_running"] is False
    assert stale.status()["postgres_running"] is False
    stale.down()
    time.sleep(0.2)
    assert sleeper.poll() is None

    fresh = Infra.up(state, durable=False)  # the stale postmaster.pid does not block a start
    assert fresh.started_here == {"nats", "postgres"}
    assert fresh.status()["nats_running"] and fresh.status()["postgres_running"]
    assert sleeper.poll() is None


def test_a_zombie_is_not_a_running_server(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    conf = tmp_path / "nats.conf"
    server = NatsServer(
        "127.0.0.1", free_port(), str(tmp_path), str(conf), str(tmp_path / "log"), pid=proc.pid
    )
    try:
        assert not server.running()
    finally:
        proc.wait()


def test_postgres_start_failure_quotes_the_server_log(tmp_path: Path, squatter: socket.socket) -> None:
    port = squatter.getsockname()[1]
    with pytest.raises(InfraError) as err:
        PostgresServer.start(tmp_path, port=port, durable=False, timeout_s=10).destroy()
    message = str(err.value)
    assert "could not create any TCP/IP sockets" in message
    log = re.search(r"(/\S+/server\.log):", message)
    assert log is not None, message
    shutil.rmtree(Path(log.group(1)).parent)


def test_down_only_stops_what_this_up_started(state: Path) -> None:
    owner = Infra.up(state, durable=False)
    assert owner.started_here == {"nats", "postgres"}
    guest = Infra.up(state, durable=False)
    assert guest.started_here == set()

    guest.down(only_started_here=True)
    assert owner.nats.running() and owner.postgres.running()

    owner.down(only_started_here=True)
    assert not owner.nats.running() and not owner.postgres.running()


async def test_bus_refuses_a_server_with_a_smaller_max_payload(tmp_path: Path, run_id: str) -> None:
    server = NatsServer.start(tmp_path, max_payload_bytes=MIB)
    try:
        with pytest.raises(BusConfigError, match=rf"max_payload {MIB}.*max_payload_bytes.*{8 * MIB}"):
            await Bus.connect(BusConfig(nats_url=server.url), run_id, name="test")
        bus = await Bus.connect(BusConfig(nats_url=server.url, max_payload_bytes=MIB), run_id, name="test")
        await bus.close()
    finally:
        server.stop()


def test_infra_up_uses_the_configured_max_payload(state: Path, tmp_path: Path) -> None:
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(f"[bus]\nmax_payload_bytes = {16 * MIB}\n")
    with pytest.raises(SystemExit) as done:
        cli_main(["infra", "up", "--state-dir", str(state.parent), "--config", str(run_toml)])
    assert done.value.code == 0
    infra = Infra.load(state)
    assert infra is not None
    assert nats_info(infra.nats.port)["max_payload"] == 16 * MIB

    with pytest.raises(InfraError, match=f"max_payload {16 * MIB}.*{32 * MIB}"):
        Infra.up(state, max_payload_bytes=32 * MIB)


def test_a_nats_server_whose_pid_went_unrecorded_is_found(state: Path) -> None:
    infra = Infra.up(state, durable=False)
    record = json.loads((state / STATE_FILE).read_text())
    record["nats"]["pid"] = 0
    (state / STATE_FILE).write_text(json.dumps(record))

    loaded = Infra.load(state)
    assert loaded is not None
    assert loaded.status()["nats_running"] is True
    assert Infra.up(state, durable=False).started_here == set()
    loaded.down()
    assert not alive(infra.nats.pid)


async def nats_login(url: str) -> None:
    nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    await nc.close()


def no_password(url: str) -> str:
    return url.replace(
        url[url.index("//") + 2 : url.index("@") + 1], "postgres@" if "postgres" in url else ""
    )


async def test_servers_need_the_state_dirs_password(
    state: Path, run_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    infra = await asyncio.to_thread(Infra.up, state, durable=False)
    secret = state / PASSWORD_FILE
    password = secret.read_text().strip()
    assert secret.stat().st_mode & 0o777 == 0o600
    assert password and password in infra.nats.url and password in infra.postgres.url
    assert password not in (state / STATE_FILE).read_text()

    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(no_password(infra.postgres.dsn)).close()
    with pytest.raises(nats.errors.Error):
        await nats_login(no_password(infra.nats.url))

    await asyncio.to_thread(upgrade, infra.postgres.url)  # what the launcher passes on works
    ledger = Ledger.connect(infra.postgres.url)
    await ledger.close()
    bus = await Bus.connect(BusConfig(nats_url=infra.nats.url), run_id, name="test")
    await bus.close()

    with pytest.raises(SystemExit):
        cli_main(["infra", "status", "--state-dir", str(state.parent)])
    shown = capsys.readouterr().out
    assert "nats_running: True" in shown and password not in shown


async def test_a_state_dir_from_before_passwords_is_switched_over(state: Path) -> None:
    old_nats = NatsServer.start(state)
    old_pg = PostgresServer.start(state, durable=False)
    assert not old_pg.password and "@" not in old_nats.url
    record = {
        "nats": {k: v for k, v in dataclasses.asdict(old_nats).items() if k != "password"},
        "postgres": {k: v for k, v in dataclasses.asdict(old_pg).items() if k != "password"},
    }
    (state / STATE_FILE).write_text(json.dumps(record))
    with psycopg.connect(old_pg.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")

    reused = await asyncio.to_thread(Infra.up, state, durable=False)
    assert reused.started_here == set()
    with psycopg.connect(reused.postgres.dsn) as conn:
        conn.execute("SELECT * FROM kept")
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(old_pg.dsn).close()
    await nats_login(reused.nats.url)  # the old nats-server has no users yet: it takes any login

    reused.down()
    old_nats.stop()
    fresh = await asyncio.to_thread(Infra.up, state, durable=False)
    assert fresh.started_here == {"nats", "postgres"}
    await nats_login(fresh.nats.url)
    with pytest.raises(nats.errors.Error):
        await nats_login(old_nats.url.replace(str(old_nats.port), str(fresh.nats.port)))
