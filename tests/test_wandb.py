"""Weights & Biases: ledger rows reach an offline W&B run, once each, and a missing package is named.

The offline run is read back from its `.wandb` file (W&B's record log: LevelDB's log format, each
record a `wandb_internal_pb2.Record`), so the test checks what W&B would upload, not our calls.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from offbeat.config import RunConfig, RunSection
from offbeat.ledger import Ledger
from offbeat.progress import Progress
from offbeat.report import log_to_wandb
from offbeat.wandb_sink import WandbConfig, WandbMissingError, WandbSink, require_wandb

pytestmark = pytest.mark.integration
needs_wandb = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None,
    reason="wandb is not installed (the optional extra: pip install 'offbeat[wandb]')",
)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """W&B offline, with its config and caches in the test's directory instead of $HOME."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path / "wb"


def history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The history rows of an offline run, read from its `run-*.wandb` record log."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    data = path.read_bytes()
    block, pos, pending, rows = 32 * 1024, 7, b"", []  # 7: the file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


async def add_steps(ledger: Ledger, run_id: str, steps: range) -> None:
    await ledger.upsert_trainer_steps(
        [
            {
                "run_id": run_id,
                "step": s,
                "version": s,
                "consumed": 8,
                "dropped": 0,
                "metrics": {
                    "reward_mean": s / 10,
                    "loss": 1.0 / s,
                    "tokens_per_s": 100.0 * s,
                    "staleness_mean": 0.5,
                },
            }
            for s in steps
        ]
    )


async def add_evals(ledger: Ledger, run_id: str, evals: dict[int, float]) -> None:
    await ledger.upsert_policy_versions(
        [
            {
                "run_id": run_id,
                "version": v,
                "step": v,
                "parent": v - 1,
                "uri": "",
                "sha256": "",
                "eval_reward": r,
                "eval_count": 4,
            }
            for v, r in evals.items()
        ]
    )


@needs_wandb
async def test_report_logs_every_step_and_eval_of_the_ledger_to_an_offline_run(
    ledger: Ledger, database_url: str, run_id: str, offline: Path
) -> None:
    config = {"run": {"id": run_id}, "wandb": {"project": "offbeat-test", "tags": ["ci"]}}
    await ledger.upsert_run(run_id, config=config)
    await add_steps(ledger, run_id, range(1, 4))
    await add_evals(ledger, run_id, {0: 0.25, 2: 0.75})
    await ledger.upsert_trajectories(
        [{"run_id": run_id, "trajectory_id": f"t{i}", "status": "trained"} for i in range(3)]
    )

    where = await log_to_wandb(database_url, run_id, default_dir=offline)

    assert Path(where).is_relative_to(offline / "wandb"), (
        f"offline run written to {where}, not under {offline}"
    )
    rows = history(where)
    train = {r["trainer/step"]: r for r in rows if "train/reward_mean" in r}
    assert sorted(train) == [1, 2, 3], f"steps logged: {sorted(train)}"
    assert train[2]["train/reward_mean"] == pytest.approx(0.2)
    assert train[3]["train/tokens_per_s"] == pytest.approx(300.0)
    assert train[3]["trajectories/trained"] == 3, "the fates go with the newest step"
    evals = {r["eval/version"]: (r["trainer/step"], r["eval/reward"]) for r in rows if "eval/reward" in r}
    assert evals == {0: (0, 0.25), 2: (2, 0.75)}, f"eval rows: {evals}"


@needs_wandb
async def test_progress_logs_each_step_once_and_an_eval_once_it_is_complete(
    ledger: Ledger, run_id: str, offline: Path
) -> None:
    run = RunConfig(run=RunSection(id=run_id, max_steps=10))
    sink = WandbSink.open(WandbConfig(project="offbeat-test"), run_id=run_id, config={}, default_dir=offline)
    progress = Progress(run, ledger, None, live=False, wandb=sink)
    stop = asyncio.Event()
    await add_steps(ledger, run_id, range(1, 3))
    await add_evals(ledger, run_id, {0: 0.1})
    await progress._refresh(stop, 10)
    await progress._refresh(stop, 10)  # nothing new: nothing logged twice
    await add_evals(ledger, run_id, {0: 0.2, 2: 0.3})  # v0's mean grew; v2's eval has begun
    await add_steps(ledger, run_id, range(3, 5))
    await progress._refresh(stop, 10)
    await add_evals(ledger, run_id, {2: 0.4})
    await progress.close()  # logs what is left (v2's final mean) and finishes the W&B run

    rows = history(Path(sink.run.dir).parent)
    steps = [r["trainer/step"] for r in rows if "train/reward_mean" in r]
    assert steps == [1, 2, 3, 4], f"steps logged in this order: {steps}"
    evals = [(r["eval/version"], r["eval/reward"]) for r in rows if "eval/reward" in r]
    assert evals == [(0, 0.2), (2, 0.4)], f"eval rows: {evals} (a half-scored eval was logged?)"


def test_configured_without_the_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(WandbMissingError, match=r"offbeat\[wandb\]"):
        require_wandb()

    import argparse

    from offbeat import launcher

    toml = tmp_path / "run.toml"
    toml.write_text(f'[run]\nid = "w"\nstate_dir = "{tmp_path / "state"}"\n[wandb]\nproject = "p"\n')
    args = argparse.Namespace(config=str(toml), set=[])
    assert launcher.main(args) == 2
    assert "offbeat[wandb]" in capsys.readouterr().err
    assert not (tmp_path / "state").exists(), "offbeat run started something before refusing"
