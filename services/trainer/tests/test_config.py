"""Start-up checks of the `[trainer]` section against the run's shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from offbeat_trainer.config import TrainerConfig, check_run, check_run_shape

from offbeat.config import EX_CONFIG, ConfigError, RunConfig, RunSection


@pytest.mark.parametrize("max_staleness", [0, 1, 3])
def test_weights_every_up_to_max_staleness_plus_one_is_accepted(max_staleness):  # type: ignore[no-untyped-def]
    for weights_every in range(1, max_staleness + 2):
        check_run_shape(TrainerConfig(weights_every=weights_every), RunSection(max_staleness=max_staleness))


def test_weights_every_above_max_staleness_plus_one_is_refused():
    # max_staleness = 0, weights_every = 2: after step 1 every trajectory has lag 1, is dropped
    # stale, no batch forms and no version is ever published again
    with pytest.raises(ConfigError, match=r"weights_every = 2 exceeds \[run\] max_staleness \+ 1 = 1"):
        check_run_shape(TrainerConfig(weights_every=2), RunSection(max_staleness=0))
    with pytest.raises(ConfigError, match=r"set weights_every <= max_staleness \+ 1"):
        check_run_shape(TrainerConfig(weights_every=4), RunSection(max_staleness=2))


def test_the_service_refuses_the_stalling_shape_before_it_starts(service_config_file):  # type: ignore[no-untyped-def]
    sets = ["model.path=/nowhere", "run.max_staleness=1", "trainer.weights_every=3"]
    args = [str(Path(sys.executable).parent / "offbeat-trainer"), "--config", str(service_config_file)]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EX_CONFIG, proc.stderr
    assert "offbeat-trainer: [trainer] weights_every = 3 exceeds [run] max_staleness + 1 = 2" in proc.stderr


def test_a_trainer_temperature_other_than_the_rollouts_is_refused():
    def run(section: dict) -> RunConfig:  # type: ignore[type-arg]
        return RunConfig.model_validate({"orchestrator": section})

    check_run(TrainerConfig(), run({}))
    check_run(TrainerConfig(temperature=0.7), run({"sampling": {"temperature": 0.7}}))
    with pytest.raises(
        ConfigError, match=r"\[trainer\] temperature = 1.0 but \[orchestrator.sampling\] temperature = 0.7"
    ):
        check_run(TrainerConfig(), run({"sampling": {"temperature": 0.7}}))
    with pytest.raises(ConfigError, match="set both to the same value"):
        check_run(TrainerConfig(temperature=0.7), run({}))
