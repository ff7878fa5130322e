"""Makes `harness` (the live-run driver of the chaos, overload and fuzz suites) importable, and
installs the test environments once for those suites."""

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def envpkg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The test environments installed for the services (their PYTHONPATH), and importable here."""
    from harness import install_envpkg

    target = install_envpkg(tmp_path_factory.mktemp("site") / "envpkg")
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
