"""The launcher's life and its services': `offbeat run` (a real launcher process, one sandbox
service, on the session's nats-server and PostgreSQL) stops its services gracefully on SIGHUP,
its services stop when it is killed with SIGKILL, a second launcher of the same run fails at once
naming the first, the services find the server URLs in their environment and not on their command
line (where `ps` shows them to everyone), and a failure of the embedded servers is one clear line."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from offbeat import launcher as launcher_mod
from offbeat.config import RunConfig
from offbeat.launcher import Launcher, LauncherConfig

BIN = Path(sys.executable).parent


class Runs:
    """`offbeat run` processes of one test on one config; whatever they started is killed at the end."""

    def __init__(self, tmp: Path, run_id: str, nats_url: str, database_url: str) -> None:
        self.tmp, self.run_id, self.nats_url, self.database_url = tmp, run_id, nats_url, database_url
        self.config = tmp / "run.toml"
        self.config.write_text(f"""
[run]
id = "{run_id}"
state_dir = "{tmp / "state"}"

[bus]
stream_max_bytes = 268435456

[launcher]
services = ["sandbox"]
progress_interval_s = 0.5
final_eval_timeout_s = 0

[sandbox]
workers = 1
shutdown_timeout_s = 5
""")
        self.sandbox_log = tmp / "state" / "runs" / run_id / "logs" / "sandbox.log"
        self.procs: list[psutil.Popen] = []

    def launch(self, *extra: str) -> psutil.Popen:
        out = (self.tmp / f"launcher-{len(self.procs)}.log").open("wb")
        argv = [str(BIN / "offbeat"), "run", str(self.config), "--nats-url", self.nats_url]
        argv += ["--database-url", self.database_url, "--no-progress", "--no-report", *extra]
        proc = psutil.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        self.procs.append(proc)
        return proc

    def output(self, proc: psutil.Popen) -> str:
        return (self.tmp / f"launcher-{self.procs.index(proc)}.log").read_text(errors="replace")

    def logged(self, msg: str) -> int:
        text = self.sandbox_log.read_text(errors="replace") if self.sandbox_log.exists() else ""
        return text.count(f'"msg": "{msg}')

    def sandbox(self, launcher: psutil.Popen, *, timeout_s: float = 60) -> psutil.Process:
        """The launcher's sandbox once it serves its subject (`logged("serving")` grows by one)."""
        before = self.logged("serving")
        return wait(
            lambda: (
                self.logged("serving") > before
                and next((c for c in launcher.children() if "offbeat-sandbox" in " ".join(c.cmdline())), None)
            ),
            timeout_s=timeout_s,
            what="the sandbox to serve",
            alive=launcher,
            output=lambda: self.output(launcher),
        )

    def close(self) -> None:
        """Kill the launchers, then whatever still runs on this test's config (orphans included)."""
        for proc in self.procs:
            if proc.is_running():
                proc.kill()
        psutil.wait_procs(self.procs, timeout=10)
        left = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if str(self.config) in proc.cmdline():
                    proc.terminate()
                    left.append(proc)
        psutil.wait_procs(left, timeout=15)


def wait(
    predicate: Callable[[], Any],
    *,
    timeout_s: float,
    what: str,
    alive: psutil.Popen | None = None,
    output: Callable[[], str] = str,
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            raise AssertionError(
                f"launcher exited {alive.returncode} waiting for {what}:\n{output()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{output()[-3000:]}")
        time.sleep(0.1)


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # ours to reap or the init process's
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def runs(tmp_path: Path, run_id: str, nats_url: str, database_url: str) -> Iterator[Runs]:
    r = Runs(tmp_path, run_id, nats_url, database_url)
    yield r
    r.close()


@pytest.mark.integration
def test_sighup_stops_the_run_gracefully(runs: Runs) -> None:
    # a closed terminal killed the launcher at once and left its services running
    launcher = runs.launch()
    sandbox = runs.sandbox(launcher)
    launcher.send_signal(signal.SIGHUP)
    assert launcher.wait(timeout=60) == 0, runs.output(launcher)
    assert gone(sandbox) and runs.logged("stopped") == 1


@pytest.mark.integration
def test_the_services_of_a_killed_launcher_get_sigterm_and_exit(runs: Runs) -> None:
    # kill -9 of the launcher left its services running (parent pid 1) beside the next launcher's
    launcher = runs.launch()
    sandbox = runs.sandbox(launcher)
    launcher.kill()
    launcher.wait(timeout=10)
    wait(lambda: gone(sandbox), timeout_s=30, what="the orphaned sandbox to exit")
    # SIGTERM, once per thread of the dead launcher (the kernel signals at each reparenting): the
    # service drains once and stops cleanly, it does not take the repeats for "exit now"
    assert runs.logged("stopped") == 1 and runs.logged("second signal") == 0


@pytest.mark.integration
def test_a_second_launcher_of_the_same_run_fails_at_once(runs: Runs) -> None:
    first = runs.launch()
    runs.sandbox(first)
    second = runs.launch("--resume")
    assert second.wait(timeout=60) == 1
    said = f"run '{runs.run_id}' in {runs.tmp / 'state'} is already running (offbeat run pid {first.pid})"
    assert f"offbeat run: {said}; stop that one first" in runs.output(second)
    assert runs.logged("started") == 1 and first.poll() is None
    first.kill()  # the kernel releases the lock of a killed launcher
    first.wait(timeout=10)
    third = runs.launch("--resume")
    runs.sandbox(third)
    third.send_signal(signal.SIGTERM)
    assert third.wait(timeout=60) == 0, runs.output(third)


@pytest.mark.integration
def test_the_services_get_the_urls_in_their_environment_not_on_their_command_line(runs: Runs) -> None:
    runs.database_url = runs.database_url.replace("//postgres@", "//postgres:s3cret@")  # trust auth: accepted
    launcher = runs.launch("--set", "bus.nats_url=nats://127.0.0.1:1")  # the launcher's --nats-url wins
    sandbox = runs.sandbox(launcher)
    cmdline = Path(f"/proc/{sandbox.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "://" not in cmdline and "s3cret" not in cmdline and "nats_url" not in cmdline, cmdline
    nats_port = int(runs.nats_url.rsplit(":", 1)[1])
    assert any(c.raddr and c.raddr.port == nats_port for c in sandbox.net_connections("tcp"))
    assert sandbox.environ()["OFFBEAT__LEDGER__DATABASE_URL"] == runs.database_url
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=60) == 0, runs.output(launcher)


def test_the_run_lock_names_the_launcher_holding_it(tmp_path: Path) -> None:
    run = RunConfig.model_validate({"run": {"id": "r", "state_dir": str(tmp_path)}})
    first = Launcher(run, LauncherConfig(), argparse.Namespace(set=[]))._lock()
    second = Launcher(run, LauncherConfig(), argparse.Namespace(set=[]))
    with pytest.raises(SystemExit, match=rf"already running \(offbeat run pid {os.getpid()}\)"):
        second._lock()
    os.close(first)
    os.close(second._lock())


def test_embedded_servers_that_fail_to_start_are_one_clear_line(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from offbeat.infra import Infra, InfraError

    def up(*args: object, **kwargs: object) -> Infra:
        raise InfraError("nats-server exited with 1: port in use")

    monkeypatch.setattr(Infra, "up", up)
    config = tmp_path / "run.toml"
    config.write_text(f'[run]\nstate_dir = "{tmp_path / "state"}"\n')
    args = argparse.Namespace(
        config=str(config), set=[], nats_url=None, database_url=None, resume=False, fresh=False
    )
    assert launcher_mod.main(args) == 1
    err = capsys.readouterr().err
    assert (
        err == "offbeat run: the embedded NATS/PostgreSQL servers: nats-server exited with 1: port in use\n"
    )
