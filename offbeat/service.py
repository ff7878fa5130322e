"""What every service process shares: config loading, logging, /healthz + /metrics, signals.

A service's `__main__` parses its arguments, then calls `run_service(...)` with an async `main`
that receives a `ServiceContext` (the run config, its own section, the bus, a stop event, and a
health flag). SIGTERM/SIGINT set the stop event; the service drains and returns. A service that
has not exited `shutdown_timeout_s + HARD_EXIT_GRACE_S` after the signal (a cleanup awaiting a
server that is gone, a thread that never returns) is ended by a watchdog thread, as is one whose
event loop is blocked; a second signal ends it at once.

Not covered: the service's own loop (that is the service's package) or supervision (the launcher).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, NoReturn, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from offbeat.config import EX_CONFIG, ConfigError, RunConfig, ServiceConfig, load_run_config, mask_url

C = TypeVar("C", bound=ServiceConfig)
log = logging.getLogger("offbeat.service")

HARD_EXIT_GRACE_S = 10.0
"""Beyond `shutdown_timeout_s`, time for closing the bus and the health server after a signal."""
HARD_EXIT_CODE = 70

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra=` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup_logging(service: str, level: str = "INFO", *, json_lines: bool | None = None) -> None:
    json_lines = not sys.stderr.isatty() if json_lines is None else json_lines
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(service)
        if json_lines
        else logging.Formatter(f"%(asctime)s {service} %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("nats").setLevel(max(logging.WARNING, root.level))


class HealthServer:
    """HTTP /healthz (200 when healthy, 503 otherwise, JSON details) and Prometheus /metrics."""

    def __init__(self, host: str, port: int, details: Callable[[], dict[str, Any]]) -> None:
        self.healthy = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/metrics":
                    body, ctype, code = generate_latest(), CONTENT_TYPE_LATEST, 200
                elif path == "/healthz":
                    body = json.dumps({"healthy": outer.healthy, **details()}, default=str).encode()
                    ctype, code = "application/json", 200 if outer.healthy else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class ServiceContext(Generic[C]):
    name: str
    run: RunConfig
    config: C
    bus: Any  # offbeat.bus.Bus; typed loosely so `--help` never imports nats
    stop: asyncio.Event
    health: HealthServer
    started_at: float = field(default_factory=time.time)
    details: dict[str, Any] = field(default_factory=dict)

    def set_healthy(self, healthy: bool = True) -> None:
        self.health.healthy = healthy


def service_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"offbeat-{name}", description=description)
    parser.add_argument("--config", "-c", help=f"run TOML file (sections [run], [bus], ... and [{name}])")
    parser.add_argument("--set", action="append", default=[], metavar="A.B=V", help="override a config field")
    parser.add_argument("--nats-url", help="overrides bus.nats_url")
    parser.add_argument("--database-url", help="overrides ledger.database_url")
    parser.add_argument("--resume", action="store_true", help="continue the run from its saved state")
    return parser


def load_service_config(args: argparse.Namespace, name: str, model: type[C]) -> tuple[RunConfig, C]:
    sets: list[str] = list(args.set)
    if args.nats_url:
        sets.append(f"bus.nats_url={args.nats_url}")
    if args.database_url:
        sets.append(f"ledger.database_url={args.database_url}")
    try:
        run = load_run_config(args.config, sets=sets)
        return run, run.section(name, model)
    except ConfigError as exc:
        config_exit(name, exc)


def config_exit(name: str, error: ConfigError) -> NoReturn:
    """Say what is wrong with the configuration on stderr and exit with `EX_CONFIG`."""
    print(f"offbeat-{name}: {error}", file=sys.stderr, flush=True)
    raise SystemExit(EX_CONFIG)


def check_model_path(name: str, path: str, *, what: str = "[model] path") -> None:
    """`config_exit` for an empty model path, or a local one (absolute, `./`, `../`, `~`) that is not a
    directory; anything else may be a Hugging Face id, which only loading can check."""
    if not path:
        config_exit(name, ConfigError(f"{what} is empty: set a Hugging Face id or a local directory"))
    if missing_local_dir(path):
        config_exit(name, ConfigError(f"{what} {path!r} is not a directory"))


def missing_local_dir(path: str) -> bool:
    """Whether `path` is written as a local directory (absolute, `./`, `../`, `~`) that does not exist;
    anything else may be a Hugging Face id."""
    return path.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(path))


def run_service(
    name: str,
    run: RunConfig,
    config: C,
    main: Callable[[ServiceContext[C]], Coroutine[Any, Any, None]],
    *,
    connect_bus: bool = True,
    argv: Sequence[str] | None = None,
) -> None:
    """Set up logging and health, connect the bus, run `main` until SIGTERM/SIGINT, then close."""
    setup_logging(name, config.log_level)
    asyncio.run(_run(name, run, config, main, connect_bus=connect_bus))


def _stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, deadline_s: float) -> None:
    """SIGTERM/SIGINT set `stop`; the process exits by `deadline_s` after the first signal whatever
    it is doing, and at once on a second SIGINT (Ctrl-C twice). A repeated SIGTERM is the same
    request: a supervisor that dies sends one per thread it had (`PR_SET_PDEATHSIG`), and the drain
    it asks for must still happen. A plain `signal.signal` handler (not the loop's) runs even while
    the event loop is blocked, so the watchdog is armed in every case."""
    signals: list[int] = []

    def hard_exit(reason: str) -> None:
        log.error("%s; exiting now (exit code %d)", reason, HARD_EXIT_CODE)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(HARD_EXIT_CODE)

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)
        if len(signals) > 1:
            if signum == signal.SIGINT:
                hard_exit(f"second signal ({signal.Signals(signum).name})")
            return
        loop.call_soon_threadsafe(stop.set)
        watchdog = threading.Timer(
            deadline_s,
            hard_exit,
            args=(f"still running {deadline_s:.0f}s after {signal.Signals(signum).name}",),
        )
        watchdog.daemon = True
        watchdog.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


async def _run(
    name: str,
    run: RunConfig,
    config: C,
    main: Callable[[ServiceContext[C]], Coroutine[Any, Any, None]],
    *,
    connect_bus: bool,
) -> None:
    stop = asyncio.Event()
    _stop_on_signals(asyncio.get_running_loop(), stop, config.shutdown_timeout_s + HARD_EXIT_GRACE_S)
    ctx: ServiceContext[C]
    details: dict[str, Any] = {}
    health = HealthServer(config.health_host, config.health_port, lambda: details)
    bus = None
    try:
        if connect_bus:
            from offbeat.bus import Bus

            connecting = asyncio.create_task(Bus.connect(run.bus, run.run.id, name=f"offbeat-{name}"))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not connecting.done():  # a stop while NATS is unreachable: nothing to drain yet
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connecting
                log.info("stopped before NATS (%s) answered", mask_url(run.bus.nats_url))
                return
            bus = connecting.result()
            await bus.ensure()
        ctx = ServiceContext(
            name=name, run=run, config=config, bus=bus, stop=stop, health=health, details=details
        )
        details.update({"service": name, "run": run.run.id, "health_port": health.port})
        log.info("started", extra={"health_port": health.port, "run": run.run.id})
        main_task = asyncio.create_task(main(ctx))
        stop_task = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({main_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if main_task not in done:
            try:
                await asyncio.wait_for(main_task, timeout=config.shutdown_timeout_s)
            except TimeoutError:
                log.warning("did not drain within %.1fs; exiting", config.shutdown_timeout_s)
        else:
            stop_task.cancel()
            main_task.result()
    finally:
        health.healthy = False
        if bus is not None:
            await bus.close()
        health.close()
        log.info("stopped")
