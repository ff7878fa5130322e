"""`code`: write a Python function; hidden test cases run in the sandbox service's test mode.

The prompt gives the function's name, signature and description, never its tests. The completion's
last fenced code block (```python preferred) is sent with the tests to the sandbox
(`offbeat.sandbox_client.SandboxClient.run_tests`), which runs each call in isolation and compares
results with exact types outside the solution's process. Reward: 1 when every test passed, else 0
(`partial_credit=True` gives the passed fraction); components `correctness` and `tests_passed`.

A failure to judge is never a zero: no sandbox answering, or the sandbox reporting its own error or
overload, gives status `sandbox_error`; no code block gives `parse_error`. A solution that times out
or crashes is judged (it failed its tests). The dataset (`offbeat/envs/data/code.jsonl`, 22 tasks
with reference solutions, written for offbeat) ships in the package; `path=` loads another one.

Not covered: stdin/stdout-style tasks in the shipped dataset (the sandbox supports them; a row's
tests may use `stdin`/`expected_stdout` or `assert_code` and are passed through unchanged).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, Final

from offbeat.envs.base import (
    EnvContext,
    Environment,
    Example,
    Reward,
    RewardStatus,
    Split,
    load_rows,
    validate_split,
)
from offbeat.envs.parsers import FormatComponent, Parser, make_parser

INSTRUCTION: Final = (
    "Write a Python function `{signature}`.\n\n{description}\n\n"
    "Answer with the complete function in one ```python code block."
)


class CodeEnv(Environment):
    """Python function tasks; hidden tests run in the sandbox service's test mode."""

    def __init__(
        self,
        *,
        path: str | None = None,
        parser: str | dict[str, Any] | Parser = "code_block",
        partial_credit: bool = False,
        timeout_s: float = 30.0,
        retries: int = 2,
        test_wall_timeout_s: float = 5.0,
        memory_mb: int = 512,
        format: str | None = None,
        format_weight: float = 0.0,
    ) -> None:
        self.rows = {row["id"]: row for row in load_rows("code.jsonl", path)}
        self.parser = make_parser(parser)
        self.partial_credit = partial_credit
        self.timeout_s = timeout_s
        self.retries = retries
        self.test_wall_timeout_s = test_wall_timeout_s
        self.memory_mb = memory_mb
        self.format = FormatComponent.build(format, format_weight, self.parser)
        self._client: Any = None

    async def setup(self, ctx: EnvContext) -> None:
        """Connect to the sandbox through the service's NATS connection."""
        from offbeat.sandbox_client import SandboxClient

        if ctx.nats is not None:
            self._client = SandboxClient(
                ctx.nats, subject=ctx.sandbox_subject, timeout_s=self.timeout_s, retries=self.retries
            )

    def examples(self, split: Split = "train", seed: int = 0) -> Iterator[Example]:
        split = validate_split(split)
        keys = sorted(k for k, row in self.rows.items() if row["split"] == split)
        random.Random(seed).shuffle(keys)
        for key in keys:
            yield self.get(key)

    def get(self, key: str) -> Example:
        row = self.rows[key]
        prompt = INSTRUCTION.format(signature=row["signature"], description=row["description"])
        return Example(
            key=key,
            prompt=[{"role": "user", "content": prompt}],
            answer=row["reference"],
            tests=tuple(row["tests"]),
            metadata={"split": row["split"], "function": row["function"]},
        )

    async def score(self, example: Example, completion: str) -> Reward:
        from offbeat.sandbox_client import SandboxUnavailable
        from offbeat.v1 import sandbox_pb2

        code = self.parser(completion)
        components: dict[str, float] = {"correctness": 0.0, "tests_passed": 0.0}
        if code is None:
            total = self._with_format(components, 0.0, completion)
            return Reward(total, components, RewardStatus.PARSE_ERROR, "no code block found")
        if self._client is None:
            return Reward.failed(RewardStatus.SANDBOX_ERROR, "no sandbox connection (setup not called)")
        tests = [sandbox_pb2.TestCase(**case) for case in example.tests]
        limits = sandbox_pb2.ExecLimits(
            wall_timeout_s=self.test_wall_timeout_s, memory_bytes=self.memory_mb * 1024 * 1024
        )
        try:
            result = await self._client.run_tests(code, tests, limits=limits)
        except SandboxUnavailable as exc:
            return Reward.failed(RewardStatus.SANDBOX_ERROR, f"sandbox unavailable: {exc}")
        status = sandbox_pb2.ExecStatus.Name(result.status)
        if result.status in (sandbox_pb2.EXEC_STATUS_SANDBOX_ERROR, sandbox_pb2.EXEC_STATUS_OVERLOADED):
            return Reward.failed(RewardStatus.SANDBOX_ERROR, f"sandbox answered {status}: {result.error}")
        if not result.tests and result.status == sandbox_pb2.EXEC_STATUS_OK:
            return Reward.failed(RewardStatus.SANDBOX_ERROR, "sandbox answered OK without test results")
        if result.tests and len(result.tests) != len(tests):
            return Reward.failed(
                RewardStatus.SANDBOX_ERROR,
                f"sandbox returned {len(result.tests)} results for {len(tests)} tests",
            )
        passed = sum(1 for t in result.tests if t.passed)
        fraction = passed / len(tests) if tests else 0.0
        components["tests_passed"] = fraction
        components["correctness"] = 1.0 if tests and passed == len(tests) else 0.0
        total = fraction if self.partial_credit else components["correctness"]
        total = self._with_format(components, total, completion)
        reason = "" if passed == len(tests) else f"{passed}/{len(tests)} tests passed ({status})"
        return Reward(total, components, RewardStatus.OK, reason, code)

    def _with_format(self, components: dict[str, float], total: float, completion: str) -> float:
        return total if self.format is None else self.format.apply(components, total, completion)
