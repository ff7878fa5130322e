"""`reasoning_gym:<task>`: the procedural tasks of the `reasoning-gym` package, scored by its own rules.

Every example is generated from (dataset seed, index), so nothing is downloaded and a key
(`train:123`) finds its example again in any process. The eval split is a fixed set of
`eval_size` items from a second seed; train items whose question appears in eval are skipped, so
the splits never overlap. The score is the task's own `score_answer` applied to what the parser
extracted (by default the last `<answer>...</answer>`, as reasoning-gym's `extract_answer` does),
so our reward equals reasoning-gym's score for the same answer, including its partial credit.

Not covered: tasks that need data files reasoning-gym fetches on first use (none of the default
ones here do), and composite datasets (use one environment per task with weights instead).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Final

from offbeat.envs.base import Environment, Example, Reward, RewardStatus, Split, validate_split
from offbeat.envs.parsers import FormatComponent, Parser, make_parser

EVAL_SEED_OFFSET: Final = 1_000_003
CACHE_SIZE: Final = 4096


class ReasoningGymEnv(Environment):
    """A reasoning-gym task: procedural prompts, reasoning-gym's own verification."""

    def __init__(
        self,
        task: str,
        *,
        dataset_seed: int = 0,
        train_size: int = 100_000,
        eval_size: int = 200,
        config: dict[str, Any] | None = None,
        parser: str | dict[str, Any] | Parser = "answer_tag",
        system_prompt: str | None = "default",
        format: str | None = None,
        format_weight: float = 0.0,
    ) -> None:
        import reasoning_gym
        from reasoning_gym.utils import SYSTEM_PROMPTS

        self.task = task
        self.dataset_seed = dataset_seed
        self.train_size = train_size
        self.eval_size = eval_size
        self.parser = make_parser(parser)
        self.format = FormatComponent.build(format, format_weight, self.parser)
        if (
            not system_prompt
        ):  # None, or "" from TOML: the prompt is the bare question (short, for tiny models)
            self.system_prompt: str | None = None
        else:
            self.system_prompt = SYSTEM_PROMPTS.get(system_prompt, system_prompt)
        cfg = dict(config or {})
        self._datasets = {
            "train": reasoning_gym.create_dataset(task, seed=dataset_seed, size=train_size, **cfg),
            "eval": reasoning_gym.create_dataset(
                task, seed=dataset_seed + EVAL_SEED_OFFSET, size=eval_size, **cfg
            ),
        }
        self._eval_questions: set[str] | None = None
        self._cache: OrderedDict[str, Example] = OrderedDict()

    def describe(self) -> str:
        return f"reasoning-gym task {self.task!r}: procedural prompts, reasoning-gym's own score_answer"

    def _eval_set(self) -> set[str]:
        if self._eval_questions is None:
            ds = self._datasets["eval"]
            self._eval_questions = {ds[i]["question"] for i in range(self.eval_size)}
        return self._eval_questions

    def examples(self, split: Split = "train", seed: int = 0) -> Iterator[Example]:
        """Eval: the fixed eval items, in a seed-shuffled order. Train: one pass over `train_size`
        items in a seed-shuffled order, skipping any whose question is in eval."""
        split = validate_split(split)
        order = list(range(self.train_size if split == "train" else self.eval_size))
        random.Random(seed).shuffle(order)
        banned = self._eval_set() if split == "train" else set()
        for idx in order:
            example = self.get(f"{split}:{idx}")
            if example.metadata["entry"]["question"] in banned:
                continue
            yield example

    def get(self, key: str) -> Example:
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        split, _, index = key.partition(":")
        if split not in self._datasets or not index.isdigit():
            raise KeyError(f"{self.name or self.task}: no example {key!r}")
        idx = int(index)
        ds = self._datasets[split]
        if idx >= len(ds):
            raise KeyError(f"{self.name or self.task}: no example {key!r} (split has {len(ds)})")
        entry = ds[idx]
        prompt: str | list[dict[str, str]]
        if self.system_prompt is None:
            prompt = entry["question"]
        else:
            prompt = [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": entry["question"]},
            ]
        example = Example(
            key=key,
            prompt=prompt,
            answer=str(entry["answer"]),
            metadata={"entry": entry, "split": split, "task": self.task},
        )
        self._cache[key] = example
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return example

    async def score(self, example: Example, completion: str) -> Reward:
        return self.score_now(example, completion)

    def score_now(self, example: Example, completion: str) -> Reward:
        """The synchronous score (reasoning-gym's verification is pure Python and fast)."""
        answer = self.parser(completion)
        ds = self._datasets[example.metadata["split"]]
        correctness = float(ds.score_answer(answer, example.metadata["entry"]))
        components = {"correctness": correctness}
        total = correctness
        if self.format is not None:
            total = self.format.apply(components, total, completion)
        if not answer:
            return Reward(total, components, RewardStatus.PARSE_ERROR, "no answer found", answer)
        return Reward(total, components, RewardStatus.OK, "", answer)
