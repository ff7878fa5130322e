"""Environments: prompt sources plus rubrics. `load(name, **kwargs)` finds one by name.

Names resolve, in order, to a built-in (`math`, `code`, `reasoning_gym:<task>`) or to a Python
entry point in the group `offbeat.envs`, so a user's package adds environments without touching
ours:

    [project.entry-points."offbeat.envs"]
    my_env = "my_pkg.envs:MyEnv"         # an Environment subclass, or a function returning one

A name `family:variant` that is not registered itself resolves to the factory registered as
`family`, called with the variant as its first argument (that is how `reasoning_gym:gcd` works,
and a package may do the same).

Not covered: mixing environments by weight (the orchestrator does that from `[[envs]]`).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Final

from offbeat.envs.base import (
    EnvContext,
    Environment,
    Example,
    Reward,
    RewardStatus,
    Split,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "EnvContext",
    "Environment",
    "Example",
    "Reward",
    "RewardStatus",
    "Split",
    "available",
    "load",
]

ENTRY_POINT_GROUP: Final = "offbeat.envs"


def _math(**kwargs: Any) -> Environment:
    from offbeat.envs.math_env import MathEnv

    return MathEnv(**kwargs)


def _code(**kwargs: Any) -> Environment:
    from offbeat.envs.code_env import CodeEnv

    return CodeEnv(**kwargs)


def _reasoning_gym(task: str, **kwargs: Any) -> Environment:
    from offbeat.envs.reasoning_gym_env import ReasoningGymEnv

    return ReasoningGymEnv(task, **kwargs)


BUILTINS: Final[dict[str, Callable[..., Environment]]] = {
    "math": _math,
    "code": _code,
    "reasoning_gym": _reasoning_gym,
}


def _entry_point_factory(name: str) -> Callable[..., Environment] | None:
    matches = entry_points(group=ENTRY_POINT_GROUP, name=name)
    for ep in matches:
        return ep.load()  # type: ignore[no-any-return]
    return None


def _factory(name: str) -> Callable[..., Environment] | None:
    return BUILTINS.get(name) or _entry_point_factory(name)


class UnknownEnvironment(KeyError):
    """No environment is registered under the name; its `str` is the message (a KeyError's is quoted)."""

    def __str__(self) -> str:
        return str(self.args[0])


def load(name: str, **kwargs: Any) -> Environment:
    """The environment registered as `name` (a built-in or an `offbeat.envs` entry point)."""
    args: tuple[Any, ...] = ()
    factory = _factory(name)
    if factory is None and ":" in name:
        family, _, variant = name.partition(":")
        factory = _factory(family)
        args = (variant,)
    if factory is None:
        raise UnknownEnvironment(f"no environment {name!r}; known: {', '.join(available(expand=False))}")
    env = factory(*args, **kwargs)
    if not isinstance(env, Environment):
        raise TypeError(f"environment {name!r} resolved to {type(env).__name__}, not an Environment")
    env.name = name
    return env


def available(*, expand: bool = True) -> list[str]:
    """Names `load` accepts: built-ins, entry points, and (with `expand`) every reasoning-gym task."""
    names = ["math", "code"]
    if expand:
        try:
            from reasoning_gym.factory import DATASETS
        except ImportError:
            names.append("reasoning_gym:<task>")
        else:
            names.extend(f"reasoning_gym:{task}" for task in sorted(DATASETS))
    else:
        names.append("reasoning_gym:<task>")
    names.extend(sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}))
    return names
