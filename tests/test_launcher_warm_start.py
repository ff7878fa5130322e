"""The launcher's warm start: what SFT trains on and what its stopping check holds out, what
counts as a finished (cached) warm start, and a stop request ending a warm start under way."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

import offbeat.launcher
import offbeat.tinymodel
from offbeat.config import EnvSpec, RunConfig
from offbeat.launcher import Launcher, LauncherConfig, TinyModelSpec, WarmStartSpec

ENV = EnvSpec(
    name="reasoning_gym:basic_arithmetic",
    args={"system_prompt": "", "config": {"min_terms": 2, "max_terms": 2, "max_digits": 2}},
)


def launcher(tmp_path: Path, warm: WarmStartSpec) -> Launcher:
    run = RunConfig.model_validate(
        {"run": {"state_dir": str(tmp_path / "state")}, "envs": [ENV.model_dump()]}
    )
    return Launcher(run, LauncherConfig(warm_start=warm), argparse.Namespace(set=[]))


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line]


def test_held_out_pairs_come_after_the_training_pairs_and_never_among_them(tmp_path):  # type: ignore[no-untyped-def]
    warm = WarmStartSpec(examples=40, target_match=0.3, held_out=15)
    train, held = launcher(tmp_path, warm)._warm_start_pairs(warm, tmp_path / "sft-a")
    assert len(lines(train)) == 40 and len(lines(held)) == 15
    # the same stream of reference answers: the first 40 train, the next 15 are held out
    plain = WarmStartSpec(examples=55)
    everything, nothing = launcher(tmp_path, plain)._warm_start_pairs(plain, tmp_path / "sft-b")
    assert lines(everything) == lines(train) + lines(held)
    assert lines(nothing) == []
    assert all(set(json.loads(line)) == {"prompt", "completion"} for line in lines(held))


def test_a_data_file_gives_its_last_lines_to_the_check(tmp_path):  # type: ignore[no-untyped-def]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(10)))
    warm = WarmStartSpec(data=str(data), target_match=0.5, held_out=3)
    train, held = launcher(tmp_path, warm)._warm_start_pairs(warm, tmp_path / "sft-c")
    assert [json.loads(line)["prompt"] for line in lines(held)] == ["p7", "p8", "p9"]
    assert len(lines(train)) == 7
    too_many = WarmStartSpec(data=str(data), target_match=0.5, held_out=10)
    with pytest.raises(SystemExit, match="has 10 pairs; holding out 10"):
        launcher(tmp_path, too_many)._warm_start_pairs(too_many, tmp_path / "sft-d")


def test_target_match_is_a_probability(tmp_path):  # type: ignore[no-untyped-def]
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="target_match"):
        WarmStartSpec(target_match=1.5)


def test_match_on_train_checks_the_first_training_pairs_and_holds_none_out(tmp_path):  # type: ignore[no-untyped-def]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(5)))
    warm = WarmStartSpec(data=str(data), target_match=0.5, held_out=3, match_on_train=True)
    train, held = launcher(tmp_path, warm)._warm_start_pairs(warm, tmp_path / "sft-e")
    assert [json.loads(line)["prompt"] for line in lines(train)] == ["p0", "p1", "p2", "p3", "p4"]
    assert [json.loads(line)["prompt"] for line in lines(held)] == ["p0", "p1", "p2"]


def test_a_small_environment_cannot_give_up_all_its_pairs_to_the_check(tmp_path):  # type: ignore[no-untyped-def]
    run = RunConfig.model_validate(
        {"run": {"state_dir": str(tmp_path / "state")}, "envs": [{"name": "code"}]}
    )
    warm = WarmStartSpec(examples=100, target_match=0.2, held_out=18)
    with pytest.raises(SystemExit, match=r"\[\[envs\]\]\[0\]'s train split has 18 pairs; holding out 18"):
        Launcher(run, LauncherConfig(warm_start=warm), argparse.Namespace(set=[]))._warm_start_pairs(
            warm, tmp_path / "sft-f"
        )


def test_the_cache_key_changes_with_what_the_warm_start_trains_on(tmp_path):  # type: ignore[no-untyped-def]
    # a cached warm start was reused after the environment's args or the seed changed
    warm = WarmStartSpec(examples=40)
    key = launcher(tmp_path, warm)._warm_start_key("base", warm)
    assert launcher(tmp_path, warm)._warm_start_key("base", warm) == key
    assert launcher(tmp_path, warm)._warm_start_key("other-base", warm) != key
    more = WarmStartSpec(examples=41)
    assert launcher(tmp_path, more)._warm_start_key("base", more) != key

    def keyed(envs: list[dict[str, Any]], **run: Any) -> str:
        cfg = RunConfig.model_validate({"run": {"state_dir": str(tmp_path / "state"), **run}, "envs": envs})
        return Launcher(cfg, LauncherConfig(warm_start=warm), argparse.Namespace(set=[]))._warm_start_key(
            "base", warm
        )

    assert keyed([ENV.model_dump()]) == key
    assert keyed([{**ENV.model_dump(), "weight": 3.0}]) == key  # the mixture weight is not trained on
    other_args = {**ENV.args, "config": {**ENV.args["config"], "max_digits": 3}}
    assert keyed([{**ENV.model_dump(), "args": other_args}]) != key
    assert keyed([ENV.model_dump()], seed=1) != key

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    from_file = WarmStartSpec(data=str(data))
    first = launcher(tmp_path, from_file)._warm_start_key("base", from_file)
    data.write_text(json.dumps({"prompt": "p", "completion": "d"}) + "\n")
    assert launcher(tmp_path, from_file)._warm_start_key("base", from_file) != first
    missing = WarmStartSpec(data=str(tmp_path / "nope.jsonl"))
    with pytest.raises(SystemExit, match=r"nope\.jsonl' is not a file"):
        launcher(tmp_path, missing)._warm_start_key("base", missing)


def fake_sft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, sleep_s: float = 0) -> Launcher:
    """A launcher whose tiny model is a directory and whose `offbeat-trainer sft` is a script that
    records its pid, sleeps, then writes what SFT writes, `sft.json` last."""
    script = tmp_path / "offbeat-trainer"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, pathlib, sys, time\n"
        f"pathlib.Path({str(tmp_path / 'sft.pids')!r}).open('a').write(f'{{os.getpid()}}\\n')\n"
        f"time.sleep({sleep_s})\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'config.json').write_text('{}')\n"
        "(out / 'sft.json').write_text('{}')\n"
    )
    script.chmod(0o755)
    monkeypatch.setattr(offbeat.launcher, "_bin", lambda name: str(script))
    monkeypatch.setattr(offbeat.tinymodel, "ensure_tiny_model", lambda path, **kwargs: Path(path))
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    run = RunConfig.model_validate({"run": {"state_dir": str(tmp_path / "state")}})
    cfg = LauncherConfig(tiny_model=TinyModelSpec(), warm_start=WarmStartSpec(data=str(data)), stop_grace_s=5)
    launcher = Launcher(run, cfg, argparse.Namespace(set=[]))
    (launcher.run_dir / "logs").mkdir(parents=True)
    return launcher


def sft_pids(tmp_path: Path) -> list[int]:
    path = tmp_path / "sft.pids"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


async def test_a_warm_start_interrupted_while_saving_is_not_taken_for_a_cached_one(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    # save_pretrained writes config.json first: an SFT killed while saving was later "cached"
    launcher = fake_sft(tmp_path, monkeypatch)
    out = Path(await launcher._model_path())
    assert len(sft_pids(tmp_path)) == 1 and (out / "sft.json").exists()
    assert await launcher._model_path() == str(out) and len(sft_pids(tmp_path)) == 1  # cached now
    (out / "sft.json").unlink()  # as an SFT killed before its last write leaves it
    assert await launcher._model_path() == str(out) and len(sft_pids(tmp_path)) == 2


async def test_a_stop_request_ends_a_warm_start_under_way(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    # the SFT ran on the event loop: SIGTERM or Ctrl-C waited for it to finish, then started the run
    launcher = fake_sft(tmp_path, monkeypatch, sleep_s=30)
    task = asyncio.ensure_future(launcher._model_path())
    for _ in range(200):
        if sft_pids(tmp_path):
            break
        await asyncio.sleep(0.05)
    sft = psutil.Process(sft_pids(tmp_path)[0])
    launcher._interrupt()
    assert await asyncio.wait_for(task, timeout=10) is None
    assert not sft.is_running()
