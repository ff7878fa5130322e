"""A user's environments: repeat a number (with a group reward that sees the whole group), and a
slow variant whose scoring takes `delay_s` (for ack-deadline tests)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator, Sequence

from offbeat.envs import Environment, Example, Reward, RewardStatus
from offbeat.envs.parsers import last_number


class EchoNumber(Environment):
    """Repeat the number in the prompt (a test environment from an installed package)."""

    group_reward = True

    def __init__(self, *, size: int = 20) -> None:
        self.size = size

    def examples(self, split: str = "train", seed: int = 0) -> Iterator[Example]:
        keys = [f"{split}:{i}" for i in range(self.size)]
        random.Random(seed).shuffle(keys)
        return (self.get(k) for k in keys)

    def get(self, key: str) -> Example:
        split, _, i = key.partition(":")
        number = 1000 + int(i) if split == "eval" else int(i)
        return Example(key=key, prompt=f"Say {number}.", answer=str(number))

    async def score(self, example: Example, completion: str) -> Reward:
        answer = last_number(completion)
        if answer is None:
            return Reward(0.0, {"correctness": 0.0}, RewardStatus.PARSE_ERROR, "no number", None)
        ok = float(answer == example.answer)
        return Reward(ok, {"correctness": ok}, RewardStatus.OK, "", answer)

    async def score_group(self, example: Example, completions: Sequence[str]) -> list[Reward]:
        rewards = [await self.score(example, c) for c in completions]
        for r in rewards:
            r.components["group_members_seen"] = float(len(completions))
        return rewards


class SlowEcho(EchoNumber):
    """Repeat the number; scoring takes `delay_s` seconds (like a slow sandbox run)."""

    group_reward = False

    def __init__(self, *, size: int = 20, delay_s: float = 5.0) -> None:
        super().__init__(size=size)
        self.delay_s = delay_s

    async def score(self, example: Example, completion: str) -> Reward:
        await asyncio.sleep(self.delay_s)
        return await super().score(example, completion)
