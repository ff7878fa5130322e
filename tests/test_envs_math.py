"""`math`: equivalent forms of the reference score 1, other values 0, no answer is a parse error."""

import json
from importlib import resources

import pytest

from offbeat import envs
from offbeat.envs import RewardStatus


@pytest.fixture(scope="module")
def math_env():
    return envs.load("math")


@pytest.mark.parametrize("form", ["1/2", "0.5", "\\frac{1}{2}", "\\dfrac{1}{2}", "2/4", "0.50", "\\frac12"])
async def test_equivalent_forms_score_one(math_env, form):
    example = math_env.get("m000")  # 1/3 + 1/6
    assert example.answer == "\\frac{1}{2}"
    reward = await math_env.score(example, f"1/3 + 1/6 = 3/6, so \\boxed{{{form}}}")
    assert reward.status is RewardStatus.OK
    assert reward.total == 1.0, f"{form!r} was not judged equal to 1/2"


@pytest.mark.parametrize("form", ["0.6", "1/3", "\\frac{2}{3}", "-1/2", "2"])
async def test_a_different_value_scores_zero(math_env, form):
    reward = await math_env.score(math_env.get("m000"), f"\\boxed{{{form}}}")
    assert reward.status is RewardStatus.OK
    assert reward.total == 0.0, f"{form!r} was judged equal to 1/2"


async def test_radicals_and_pi_are_compared_symbolically(math_env):
    rows = {
        r["answer"]: r["id"]
        for r in map(json.loads, open(resources.files("offbeat.envs") / "data/math.jsonl"))
    }
    assert (await math_env.score(math_env.get(rows["6\\sqrt{2}"]), "\\boxed{\\sqrt{72}}")).total == 1.0
    assert (await math_env.score(math_env.get(rows["9\\pi"]), "\\boxed{\\pi \\cdot 9}")).total == 1.0
    assert (await math_env.score(math_env.get(rows["9\\pi"]), "\\boxed{28.27}")).total == 0.0


async def test_no_boxed_answer_is_a_parse_error_not_a_silent_zero(math_env):
    reward = await math_env.score(math_env.get("m000"), "the answer is one half")
    assert reward.status is RewardStatus.PARSE_ERROR and reward.total == 0.0
    assert "no answer" in reward.reason


async def test_a_comparison_that_times_out_is_a_timeout_not_a_silent_zero():
    # math-verify's verify() quietly answers "not equal" when its comparison times out
    env = envs.load("math", timeout_s=1)
    reward = await env.score(env.get("m000"), "\\boxed{9^{9^{9}}}")
    assert reward.status is RewardStatus.TIMEOUT and reward.total == 0.0, (reward.status, reward.reason)
    assert "math-verify took over 1s" in reward.reason


async def test_parser_is_configurable():
    env = envs.load("math", parser="answer_tag")
    assert (await env.score(env.get("m000"), "<answer>0.5</answer>")).total == 1.0
    assert (await env.score(env.get("m000"), "\\boxed{0.5}")).status is RewardStatus.PARSE_ERROR


def test_shipped_dataset_splits_are_disjoint_and_every_reference_verifies_against_itself(math_env):
    train = list(math_env.examples("train", seed=0))
    evals = list(math_env.examples("eval", seed=0))
    assert len(train) >= 30 and len(evals) >= 5
    assert not {e.key for e in train} & {e.key for e in evals}
    assert [e.key for e in math_env.examples("train", seed=0)] == [e.key for e in train]
    for example in train + evals:
        assert "\\boxed" in example.prompt[0]["content"]
        reward = math_env.score_now(example, f"\\boxed{{{example.answer}}}")
        assert reward.total == 1.0, f"{example.key}: reference {example.answer!r} does not verify"
