"""The launcher's warm-start pairs: what SFT trains on and what its stopping check holds out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from offbeat.config import EnvSpec, RunConfig
from offbeat.launcher import Launcher, LauncherConfig, WarmStartSpec

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
