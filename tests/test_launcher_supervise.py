"""The launcher's supervision: a service that died is started again, one whose configuration is
wrong is not (it would only fail the same way `max_restarts` times)."""

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
    assert spawned == [1] and launcher.failed == f"trainer exited 1 after 1 restarts; see {child.log_path}"


_sleep = asyncio.sleep


async def _no_wait(delay: float, *args: object) -> None:
    await _sleep(0)
