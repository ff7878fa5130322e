"""`offbeat report` refuses what it cannot report on before it writes or starts anything."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import pytest

from offbeat import report
from offbeat.ledger import Ledger

pytestmark = pytest.mark.integration


def _args(run: str, database_url: str, out: Path, **extra: object) -> argparse.Namespace:
    values = {"wandb": False, "wandb_project": None, "wandb_mode": None, "state_dir": str(out.parent)}
    return argparse.Namespace(run=run, database_url=database_url, out=str(out), **{**values, **extra})


async def test_a_run_the_ledger_does_not_have_is_an_error_and_nothing_is_written(
    ledger: Ledger, database_url: str, run_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await ledger.upsert_run(run_id, config={})
    out = tmp_path / "report"
    code = await asyncio.to_thread(report.main, _args("no-such-run", database_url, out))  # runs its own loop
    captured = capsys.readouterr()
    assert code == 1
    assert "offbeat report: no run 'no-such-run' in the ledger" in captured.err
    assert run_id in captured.err, "the message lists the latest runs"
    assert not out.exists()


def test_asking_for_wandb_without_the_package_fails_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "report"
    args = _args("r", "postgresql://127.0.0.1:1/none", out, wandb=True)
    assert report.main(args) == 1
    assert "offbeat[wandb]" in capsys.readouterr().err
    assert not out.exists()
