"""The launcher's warm-start pairs: what SFT trains on and what its stopping check holds out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

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
