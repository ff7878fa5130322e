"""The launcher's supervision: a service that died is started again, one whose configuration is
wrong is not (it would only fail the same way `max_restarts` times); only restarts within
`restart_window_s` count, and nothing is started once the run is stopping."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from offbeat.config import EX_CONFIG, RunConfig
from offbeat.launcher import Child, Launcher, LauncherConfig


async def _exiting(child: Child, code: int) -> None:
    with child.log_path.open("ab") as out:
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            f"import sys; print('offbeat-trainer: [trainer] weights_every = 3 is wrong', file=sys.stderr); "
            f"sys.exit({code})",
            stdout=out,
            stderr=out,
        )


async def test_a_service_that_exits_with_a_configuration_error_stops_the_run_at_once(tmp_path: Path) -> None:
    run = RunConfig.model_validate({"run": {"state_dir": str(tmp_path / "state")}})
    launcher = Launcher(run, LauncherConfig(max_restarts=5), argparse.Namespace(set=[]))
    child = Child("trainer", 0, [], tmp_path / "trainer.log")
    await _exiting(child, EX_CONFIG)
    await asyncio.wait_for(launcher._supervise(child), timeout=30)
    assert child.restarts == 0 and launcher.stopping.is_set()
    assert launcher.failed is not None
    assert launcher.failed.startswith("trainer: offbeat-trainer: [trainer] weights_every = 3 is wrong")


async def test_a_service_that_crashes_is_started_again(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    run = RunConfig.model_validate({"run": {"state_dir": str(tmp_path / "state")}})
    launcher = Launcher(run, LauncherConfig(max_restarts=1), argparse.Namespace(set=[]))
    child = Child("trainer", 0, [], tmp_path / "trainer.log")
    spawned: list[int] = []

    async def spawn(c: Child) -> None:
        spawned.append(c.restarts)
        await _exiting(c, 1)

    monkeypatch.setattr(launcher, "_spawn", spawn)
    monkeypatch.setattr(asyncio, "sleep", _no_wait)
    await _exiting(child, 1)
    await asyncio.wait_for(launcher._supervise(child), timeout=30)
    assert spawned == [1]
    assert launcher.failed == f"trainer exited 1 after 1 restarts in 3600s; see {child.log_path}"


async def test_only_the_restarts_within_the_window_count(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # the budget counted every restart of the run: crashes hours apart failed it all the same
    run = RunConfig.model_validate({"run": {"state_dir": str(tmp_path / "state")}})
    launcher = Launcher(run, LauncherConfig(max_restarts=1, restart_window_s=600), argparse.Namespace(set=[]))
    child = Child("scorer", 0, [], tmp_path / "scorer.log")
    spawned: list[int] = []

    async def spawn(c: Child) -> None:
        spawned.append(c.restarts)
        c.restarted[:] = [t - 601 for t in c.restarted]  # it then ran for longer than the window
        if len(spawned) == 3:
            launcher.stopping.set()
        await _exiting(c, 1)

    monkeypatch.setattr(launcher, "_spawn", spawn)
    monkeypatch.setattr(asyncio, "sleep", _no_wait)
    await _exiting(child, 1)
    await asyncio.wait_for(launcher._supervise(child), timeout=30)
    assert spawned == [1, 2, 3] and launcher.failed is None


async def test_a_service_is_not_started_again_once_the_run_is_stopping(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # a crash just before shutdown was restarted after its backoff, during or after the stop
    run = RunConfig.model_validate({"run": {"state_dir": str(tmp_path / "state")}})
    launcher = Launcher(run, LauncherConfig(), argparse.Namespace(set=[]))
    child = Child("scorer", 0, [], tmp_path / "scorer.log")
    spawned: list[Child] = []

    async def spawn(c: Child) -> None:
        spawned.append(c)

    async def stopped_during_backoff(delay: float, *args: object) -> None:
        launcher.stopping.set()

    monkeypatch.setattr(launcher, "_spawn", spawn)
    monkeypatch.setattr(asyncio, "sleep", stopped_during_backoff)
    await _exiting(child, 1)
    await asyncio.wait_for(launcher._supervise(child), timeout=30)
    assert spawned == [] and launcher.failed is None


async def test_no_service_is_started_once_the_run_is_stopping(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    run = RunConfig.model_validate({"run": {"state_dir": str(tmp_path / "state")}})
    launcher = Launcher(run, LauncherConfig(), argparse.Namespace(set=[], config="run.toml", resume=False))
    spawned: list[str] = []

    async def spawn(c: Child) -> None:
        spawned.append(c.name)
        if c.service == "inference":
            launcher._interrupt()  # Ctrl-C while the services are being started

    monkeypatch.setattr(launcher, "_spawn", spawn)
    await launcher._start_services(None)
    assert spawned == ["sandbox", "inference"]


_sleep = asyncio.sleep


async def _no_wait(delay: float, *args: object) -> None:
    await _sleep(0)
