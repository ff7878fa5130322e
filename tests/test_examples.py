"""The shipped run files validate with every component's own config model, before anyone runs them."""

from __future__ import annotations

from pathlib import Path

import pytest
from offbeat_inference.config import InferenceConfig
from offbeat_orchestrator.config import OrchestratorConfig
from offbeat_sandbox.config import SandboxConfig
from offbeat_scorer.config import ScorerConfig
from offbeat_trainer.config import TrainerConfig

from offbeat.config import load_run_config
from offbeat.envs import load
from offbeat.launcher import LauncherConfig

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))
SECTIONS = {
    "launcher": LauncherConfig,
    "orchestrator": OrchestratorConfig,
    "inference": InferenceConfig,
    "scorer": ScorerConfig,
    "sandbox": SandboxConfig,
    "trainer": TrainerConfig,
}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_an_example_validates_and_its_environments_load(path: Path) -> None:
    run = load_run_config(path, environ={})
    for name, model in SECTIONS.items():
        run.section(name, model)
    assert run.envs
    for spec in run.envs:
        assert next(iter(load(spec.name, **spec.args).examples("train")), None) is not None
