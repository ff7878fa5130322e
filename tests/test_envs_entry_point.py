"""An environment from an installed package loads by name through the `offbeat.envs` entry point.

The package in tests/envpkg is installed with pip into a temporary directory (a real wheel build
and a real dist-info with entry_points.txt); nothing is registered by hand.
"""

import asyncio
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offbeat import envs

PKG = Path(__file__).parent / "envpkg"


@pytest.fixture(scope="module")
def installed_envpkg(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "envpkg"
    shutil.copytree(PKG, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(target.glob("offbeat_testenv-*.dist-info/entry_points.txt")), "pip wrote no entry points"
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m.startswith("offbeat_testenv")]:
        del sys.modules[name]


def test_unknown_name_is_refused_with_the_known_ones():
    with pytest.raises(KeyError, match="reasoning_gym"):
        envs.load("echo_number_not_there")


def test_entry_point_environment_loads_by_name(installed_envpkg):
    assert "echo_number" in envs.available(expand=False)
    env = envs.load("echo_number", size=5)
    assert type(env).__module__ == "offbeat_testenv", "loaded something other than the package's class"
    assert env.name == "echo_number"
    examples = list(env.examples("train", seed=1))
    assert len(examples) == 5
    reward = asyncio.run(env.score(examples[0], f"it is {examples[0].answer}"))
    assert reward.total == 1.0


def test_entry_point_environment_shows_in_the_cli(installed_envpkg):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(installed_envpkg), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-m", "offbeat.cli", "env", "show", "echo_number", "--n", "2", "--split", "eval"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Say 10" in out.stdout and ">>> answer: 10" in out.stdout
