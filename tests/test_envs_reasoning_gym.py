"""`reasoning_gym:<task>` gives reasoning-gym's own score for the same answer, on 1,000 completions
per task: correct, wrong, partially right and malformed ones."""

import random

import pytest
import reasoning_gym
from reasoning_gym.utils import extract_answer

from offbeat import envs
from offbeat.envs import RewardStatus

TASKS = ["basic_arithmetic", "leg_counting", "fraction_simplification", "number_sorting", "spell_backward"]
N = 1000


def wrong(answer: str, rng: random.Random) -> str:
    """A different answer of the same shape."""
    try:
        return str(int(answer) + rng.choice([-2, -1, 1, 7]))
    except ValueError:
        pass
    if "/" in answer:
        num, _, den = answer.partition("/")
        return f"{num}1/{den}"
    if answer.startswith("["):
        parts = answer.strip("[]").split(", ")
        rng.shuffle(parts)
        return "[" + ", ".join(parts[::-1]) + "]" if len(parts) > 1 else "[]"
    return answer[::-1] + "x" if answer == answer[::-1] else answer[::-1]


def completion(answer: str, rng: random.Random) -> tuple[str, str]:
    """(kind, text) of one generated completion."""
    kind = rng.choice(
        [
            "correct",
            "correct_spaced",
            "wrong",
            "extra_text",
            "last_tag_wins",
            "first_tag_right",
            "no_tags",
            "unclosed",
            "empty",
            "upper_tags",
            "bare_answer",
            "newlines",
        ]
    )
    think = f"<think>{rng.choice(['easy', 'let me compute', 'hmm'])}</think>\n"
    bad = wrong(answer, rng)
    text = {
        "correct": f"{think}<answer>{answer}</answer>",
        "correct_spaced": f"{think}<answer>  {answer} </answer>",
        "wrong": f"{think}<answer>{bad}</answer>",
        "extra_text": f"{think}<answer>The answer is {answer}.</answer>",
        "last_tag_wins": f"<answer>{bad}</answer> wait, no: <answer>{answer}</answer>",
        "first_tag_right": f"<answer>{answer}</answer> actually <answer>{bad}</answer>",
        "no_tags": f"{think}The answer is {answer}",
        "unclosed": f"{think}<answer>{answer}",
        "empty": f"{think}<answer></answer>",
        "upper_tags": f"<ANSWER>{answer}</ANSWER>",
        "bare_answer": answer,
        "newlines": f"{think}<answer>\n{answer}\n</answer>\n",
    }[kind]
    return kind, text


@pytest.mark.parametrize("task", TASKS)
async def test_reward_equals_reasoning_gyms_own_score(task):
    env = envs.load(f"reasoning_gym:{task}")
    reference = reasoning_gym.create_dataset(task, seed=0, size=100_000)  # the env's train dataset
    rng = random.Random(task)
    kinds: dict[str, int] = {}
    scores: set[float] = set()
    for _ in range(N):
        idx = rng.randrange(100_000)
        entry = reference[idx]
        example = env.get(f"train:{idx}")
        assert example.answer == entry["answer"], "the key did not give back the same generated item"
        kind, text = completion(entry["answer"], rng)
        kinds[kind] = kinds.get(kind, 0) + 1
        extracted = extract_answer(text)
        expected = reference.score_answer(extracted, entry)
        reward = await env.score(example, text)
        assert reward.total == expected, (
            f"{task} {kind}: ours {reward.total} vs reasoning-gym {expected} for {text!r}"
        )
        assert reward.components["correctness"] == expected
        assert reward.answer == extracted
        if extracted:
            assert reward.status is RewardStatus.OK
        else:
            assert reward.status is RewardStatus.PARSE_ERROR, f"{kind}: {text!r} gave {reward.status}"
        scores.add(expected)
    assert len(kinds) == 12, f"not every kind of completion was generated: {kinds}"
    assert 1.0 in scores and min(scores) <= 0.01, f"{task}: scores seen {scores}"


def test_format_reward_is_a_separate_component():
    env = envs.load("reasoning_gym:basic_arithmetic", format="think_answer", format_weight=0.5)
    example = env.get("train:3")
    good = env.score_now(example, f"<think>ok</think><answer>{example.answer}</answer>")
    sloppy = env.score_now(example, f"so <answer>{example.answer}</answer> I think")
    assert good.components == {"correctness": 1.0, "format": 1.0} and good.total == 1.5
    assert sloppy.components == {"correctness": 1.0, "format": 0.0} and sloppy.total == 1.0


def test_splits_are_deterministic_and_never_overlap():
    env = envs.load("reasoning_gym:basic_arithmetic", eval_size=300)
    eval_examples = list(env.examples("eval", seed=0))
    assert len(eval_examples) == 300
    eval_questions = {e.metadata["entry"]["question"] for e in eval_examples}
    train = env.examples("train", seed=5)
    first = [next(train) for _ in range(3000)]
    assert not eval_questions & {e.metadata["entry"]["question"] for e in first}
    again = env.examples("train", seed=5)
    assert [e.key for e in first[:50]] == [next(again).key for _ in range(50)]
    other = env.examples("train", seed=6)
    assert [e.key for e in first[:50]] != [next(other).key for _ in range(50)]
    assert {e.key for e in eval_examples} == {f"eval:{i}" for i in range(300)}
    with pytest.raises(KeyError):
        env.get("eval:300")
    with pytest.raises(ValueError):
        next(env.examples("test"))  # type: ignore[arg-type]


def test_system_prompt_is_configurable():
    bare = envs.load("reasoning_gym:gcd", system_prompt="")
    assert isinstance(bare.get("train:1").prompt, str)
    chat = envs.load("reasoning_gym:gcd", system_prompt="Answer in <answer></answer>.")
    assert chat.get("train:1").prompt[0] == {"role": "system", "content": "Answer in <answer></answer>."}
    assert envs.load("reasoning_gym:gcd").get("train:1").prompt[0]["content"].startswith("Given a problem")
