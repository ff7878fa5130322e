"""A user's environments: repeat a number (with a group reward that sees the whole group), a
slow variant whose scoring takes `delay_s` (for ack-deadline tests), a variant judged by running
a program in the sandbox service (so every score needs a sandbox: the chaos suite kills it), and
one prompt whose scoring kills the scorer's process (a poison message: the chaos suite's)."""

from __future__ import annotations

import asyncio
import itertools
import os
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


class SandboxEcho(EchoNumber):
    """Repeat the number; the completion is echoed by a program run in the sandbox service, and the
    number is read from that program's output. No sandbox answering is `sandbox_error`, never a 0."""

    group_reward = False

    def __init__(self, *, size: int = 20, timeout_s: float = 5.0, retries: int = 1) -> None:
        super().__init__(size=size)
        self.timeout_s = timeout_s
        self.retries = retries
        self._client = None

    async def setup(self, ctx) -> None:  # type: ignore[no-untyped-def]
        from offbeat.sandbox_client import SandboxClient

        if ctx.nats is not None:
            self._client = SandboxClient(
                ctx.nats, subject=ctx.sandbox_subject, timeout_s=self.timeout_s, retries=self.retries
            )

    async def score(self, example: Example, completion: str) -> Reward:
        from offbeat.sandbox_client import SandboxUnavailable
        from offbeat.v1 import sandbox_pb2

        if self._client is None:
            return Reward.failed(RewardStatus.SANDBOX_ERROR, "no sandbox connection")
        try:
            result = await self._client.run(f"import sys\nsys.stdout.write({completion!r})\n")
        except SandboxUnavailable as exc:
            return Reward.failed(RewardStatus.SANDBOX_ERROR, f"sandbox unavailable: {exc}")
        if result.status != sandbox_pb2.EXEC_STATUS_OK:
            name = sandbox_pb2.ExecStatus.Name(result.status)
            return Reward.failed(RewardStatus.SANDBOX_ERROR, f"sandbox answered {name}: {result.error}")
        return await super().score(example, result.stdout.decode("utf-8", errors="replace"))


class PoisonEcho(EchoNumber):
    """Repeat the number; scoring any completion of the `poison_index`-th training prompt (in the
    order of `examples("train", seed)`, which is the order a run with that seed draws them) kills
    the scoring process at once, as a rubric that crashes the interpreter or runs out of memory
    would: no exception, no answer, every time it is delivered."""

    group_reward = False

    def __init__(self, *, size: int = 200, poison_index: int = 3, seed: int = 0) -> None:
        super().__init__(size=size)
        self.poison_key = next(itertools.islice(self.examples("train", seed), poison_index, None)).key

    async def score(self, example: Example, completion: str) -> Reward:
        if example.key == self.poison_key:
            os._exit(70)
        return await super().score(example, completion)
