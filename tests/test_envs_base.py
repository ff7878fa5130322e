"""The environment API's shared types: statuses map onto the proto, failures are never judged."""

import pytest

from offbeat import envs
from offbeat.envs import Reward, RewardStatus
from offbeat.v1 import rollout_pb2


def test_every_status_maps_to_the_proto_and_back():
    seen = set()
    for status in RewardStatus:
        value = status.to_proto()
        assert value != rollout_pb2.REWARD_STATUS_UNSPECIFIED
        assert RewardStatus.from_proto(value) is status
        assert rollout_pb2.RewardStatus.Name(value) == f"REWARD_STATUS_{status.name}"
        seen.add(value)
    assert len(seen) == len(RewardStatus)


def test_only_ok_and_parse_error_are_judgements():
    assert {s for s in RewardStatus if s.judged} == {RewardStatus.OK, RewardStatus.PARSE_ERROR}
    failed = Reward.failed(RewardStatus.SANDBOX_ERROR, "down")
    assert failed.total == 0.0 and not failed.status.judged and failed.reason == "down"


async def test_default_group_hook_scores_each_completion_alone():
    env = envs.load("math")
    example = env.get("m000")
    rewards = await env.score_group(example, ["\\boxed{0.5}", "\\boxed{2}", "no box"])
    assert [r.total for r in rewards] == [1.0, 0.0, 0.0]
    assert [r.status for r in rewards] == [RewardStatus.OK, RewardStatus.OK, RewardStatus.PARSE_ERROR]


async def test_format_reward_is_a_component_of_math_too():
    env = envs.load("math", format="has_answer", format_weight=0.1)
    reward = await env.score(env.get("m000"), "\\boxed{0.6}")
    assert reward.components == {"correctness": 0.0, "format": 1.0}
    assert reward.total == pytest.approx(0.1)


def test_bad_arguments_fail_at_load():
    with pytest.raises(ValueError, match="unknown parser"):
        envs.load("math", parser="nope")
    with pytest.raises(ValueError, match="unknown format"):
        envs.load("reasoning_gym:gcd", format="nope")
    with pytest.raises(TypeError):
        envs.load("code", no_such_arg=1)
