"""`math`: short math problems with reference answers, judged by `math-verify` equivalence.

The answer is extracted with the environment's parser (by default the last `\\boxed{...}`) and
compared with the reference by math-verify, so `1/2`, `0.5` and `\\frac{1}{2}` are the same answer
and `0.6` is not. The dataset (`offbeat/envs/data/math.jsonl`, 48 problems written for offbeat,
each with `id`, `split`, `problem`, `answer`) ships in the package; `path=` loads another file of
the same shape.

math-verify bounds its parse/verify time with SIGALRM, which works only in the main thread; in
other threads we run it without its timeout (the scorer scores on its event loop, in the main
thread). A timeout becomes the `timeout` status, not a zero.

Not covered: proofs, multi-part answers, or a dataset big enough to train a real model on.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any, Final

from offbeat.envs.base import Environment, Example, Reward, RewardStatus, Split, load_rows, validate_split
from offbeat.envs.parsers import FormatComponent, Parser, make_parser

INSTRUCTION: Final = "Solve the problem. Put your final answer in \\boxed{}."


class MathEnv(Environment):
    """Math problems; answers judged equivalent by math-verify (1/2 == 0.5 == \\frac{1}{2})."""

    def __init__(
        self,
        *,
        path: str | None = None,
        parser: str | dict[str, Any] | Parser = "boxed",
        instruction: str = INSTRUCTION,
        timeout_s: int = 5,
        format: str | None = None,
        format_weight: float = 0.0,
    ) -> None:
        self.rows = {row["id"]: row for row in load_rows("math.jsonl", path)}
        self.parser = make_parser(parser)
        self.instruction = instruction
        self.timeout_s = timeout_s
        self.format = FormatComponent.build(format, format_weight, self.parser)

    def examples(self, split: Split = "train", seed: int = 0) -> Iterator[Example]:
        split = validate_split(split)
        keys = sorted(k for k, row in self.rows.items() if row["split"] == split)
        random.Random(seed).shuffle(keys)
        for key in keys:
            yield self.get(key)

    def get(self, key: str) -> Example:
        row = self.rows[key]
        return Example(
            key=key,
            prompt=[{"role": "user", "content": f"{row['problem']}\n\n{self.instruction}"}],
            answer=row["answer"],
            metadata={"split": row["split"]},
        )

    async def score(self, example: Example, completion: str) -> Reward:
        return self.score_now(example, completion)

    def score_now(self, example: Example, completion: str) -> Reward:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException

        answer = self.parser(completion)
        components: dict[str, float] = {"correctness": 0.0}
        status, reason = RewardStatus.OK, ""
        if not answer:
            status, reason = RewardStatus.PARSE_ERROR, "no answer found"
        else:
            timeout = self.timeout_s if threading.current_thread() is threading.main_thread() else None
            gold = parse(f"${example.answer}$", parsing_timeout=timeout)
            try:
                pred = parse(f"${answer}$", parsing_timeout=timeout, raise_on_error=True)
            except TimeoutException:
                return Reward.failed(RewardStatus.TIMEOUT, f"math-verify took over {self.timeout_s}s")
            except Exception as exc:  # math-verify raises anything sympy raises on odd input
                pred, reason = [], f"{type(exc).__name__}: {exc}"
            if not pred:
                status, reason = RewardStatus.PARSE_ERROR, reason or f"answer {answer[:80]!r} is not math"
            else:
                try:  # without raise_on_error, a comparison that times out is quietly "not equal"
                    same = verify(gold, pred, timeout_seconds=timeout, raise_on_error=True)
                except TimeoutException:
                    return Reward.failed(RewardStatus.TIMEOUT, f"math-verify took over {self.timeout_s}s")
                except Exception as exc:  # sympy cannot compare them: not the reference answer
                    same, reason = False, f"not comparable with the reference: {type(exc).__name__}: {exc}"
                if same:
                    components["correctness"] = 1.0
        total = components["correctness"]
        if self.format is not None:
            total = self.format.apply(components, total, completion)
        return Reward(total, components, status, reason, answer)
