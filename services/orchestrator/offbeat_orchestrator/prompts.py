"""Prompt streams: a seeded, weighted mixture over the run's environments.

Each environment's train split is read in the order its seed fixes and started again with the
next seed when it runs out (epoch e uses `seed + e`). Which environment the next prompt comes
from is drawn with probability proportional to `[[envs]] weight`, from a `random.Random(seed)`,
so a run with the same seed sends the same prompts in the same order. Prompts named in a skip set
(the difficulty filter) are passed over, up to a bound so a filter that matches everything never
stalls the run.

Not covered: loading environments (`offbeat.envs.load`) or scoring.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any, Final, Protocol

from offbeat.v1 import rollout_pb2

MAX_SKIPS: Final = 1000


class ExampleLike(Protocol):
    key: str
    prompt: Any


class ExampleSource(Protocol):
    """What the scheduler needs of an environment (`offbeat.envs.Environment` is one)."""

    def examples(self, split: Any = ..., seed: int = ...) -> Iterator[Any]: ...


class PromptStream:
    """One environment's split, cycled epoch after epoch."""

    def __init__(self, source: ExampleSource, *, split: str, seed: int) -> None:
        self.source = source
        self.split = split
        self.seed = seed
        self.epoch = 0
        self._it = iter(source.examples(split, seed))

    def next(self) -> ExampleLike:
        for _ in range(2):
            try:
                return next(self._it)  # type: ignore[no-any-return]
            except StopIteration:
                self.epoch += 1
                self._it = iter(self.source.examples(self.split, self.seed + self.epoch))
        raise ValueError(f"environment {self.source!r} has no examples in split {self.split!r}")


class Mixture:
    """Weighted, seeded choice among environments' prompt streams."""

    def __init__(
        self, envs: Sequence[tuple[str, float, ExampleSource]], *, seed: int, split: str = "train"
    ) -> None:
        self.names = [name for name, _, _ in envs]
        self.weights = [weight for _, weight, _ in envs]
        self.streams = [PromptStream(source, split=split, seed=seed) for _, _, source in envs]
        self.rng = random.Random(seed)

    def __bool__(self) -> bool:
        return bool(self.streams)

    def draw(self, skip: set[tuple[str, str]] | None = None) -> tuple[str, ExampleLike]:
        """(environment name, example); examples whose (env, key) is in `skip` are passed over."""
        for _ in range(MAX_SKIPS):
            i = self.rng.choices(range(len(self.streams)), weights=self.weights)[0]
            example = self.streams[i].next()
            if not skip or (self.names[i], example.key) not in skip:
                return self.names[i], example
        return self.names[i], example


def eval_prompts(
    envs: Sequence[tuple[str, float, ExampleSource]], *, count: int, seed: int, split: str = "eval"
) -> list[tuple[str, ExampleLike]]:
    """The first `count` examples of each environment's eval split (the same ones every time)."""
    out: list[tuple[str, ExampleLike]] = []
    for name, _, source in envs:
        for i, example in enumerate(source.examples(split, seed)):
            if i >= count:
                break
            out.append((name, example))
    return out


def set_prompt(request: rollout_pb2.RolloutRequest, prompt: Any) -> None:
    """Put text or chat messages (`[{"role": ..., "content": ...}]`) into a request."""
    if isinstance(prompt, str):
        request.text = prompt
        return
    request.chat.messages.extend(
        rollout_pb2.ChatMessage(role=str(m["role"]), content=str(m["content"])) for m in prompt
    )
