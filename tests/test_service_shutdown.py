"""A service process always ends after SIGTERM: drained, or by the watchdog when it cannot drain."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from offbeat.service import HARD_EXIT_CODE, HARD_EXIT_GRACE_S

SERVICE = """
import asyncio, sys, time
from offbeat.config import RunConfig, ServiceConfig
from offbeat.service import run_service

async def main(ctx):
    ctx.set_healthy()
    print("ready", flush=True)
    if sys.argv[1] == "blocked":
        time.sleep(3600)  # the event loop never gets control back
    try:
        await ctx.stop.wait()
    finally:
        while True:  # a cleanup that never ends, and swallows every cancellation
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                pass

run_service("stuck", RunConfig(), ServiceConfig(shutdown_timeout_s=0.5, health_port=0), main, connect_bus=False)
"""


def start(mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVICE, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_service_that_cannot_drain_is_ended_by_the_watchdog() -> None:
    procs = {mode: start(mode) for mode in ("stuck_cleanup", "blocked")}
    sent = time.monotonic()
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    try:
        for mode, proc in procs.items():
            assert proc.wait(timeout=0.5 + HARD_EXIT_GRACE_S + 20) == HARD_EXIT_CODE, mode
            assert "after SIGTERM; exiting now" in proc.stderr.read(), mode  # type: ignore[union-attr]
        assert time.monotonic() - sent >= 0.5 + HARD_EXIT_GRACE_S - 1
    finally:
        for proc in procs.values():
            proc.kill()


def test_a_second_signal_ends_a_service_at_once() -> None:
    proc = start("stuck_cleanup")
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # past its drain timeout: now in the cleanup that never ends
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == HARD_EXIT_CODE
        assert "second signal (SIGINT)" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        proc.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_service_that_drains_exits_cleanly(signum: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVICE.replace("while True:", "while False:"), "drains"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signum)
    assert proc.wait(timeout=10) == 0


UNREACHABLE = """
import asyncio
from offbeat.config import BusConfig, RunConfig, ServiceConfig
from offbeat.service import run_service

async def main(ctx):
    raise AssertionError("the bus never connected")

run = RunConfig(bus=BusConfig(nats_url="nats://user:secret@127.0.0.1:1"))
run_service("waiting", run, ServiceConfig(health_port=0), main)
"""


def test_a_service_waiting_for_nats_stops_at_once_on_sigterm() -> None:
    # it retried the connection until the watchdog's hard exit, 20 s later
    proc = subprocess.Popen(
        [sys.executable, "-c", UNREACHABLE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        line = ""
        while "nats error" not in line:  # it is trying
            line = proc.stderr.readline()
            assert line, "exited before trying NATS"
        assert "127.0.0.1:1" in line and "secret" not in line, line
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - sent < 5
        assert "stopped before NATS" in proc.stderr.read()
    finally:
        proc.kill()
