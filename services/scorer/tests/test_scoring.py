"""`Scorer.score_batch` without the bus: the lanes keep slow rubrics concurrent (and bounded), a
rubric past `score_timeout_s` times out alone, and a bad completion fails alone."""

import asyncio
import time
from collections.abc import Iterator

from offbeat_scorer.config import ScorerConfig
from offbeat_scorer.scoring import Scorer

from offbeat.bus import Reject
from offbeat.envs import Environment, Example, Reward, RewardStatus
from offbeat.v1 import rollout_pb2


class Sleepy(Environment):
    """Completion text `"<seconds>"`: scoring sleeps that long (0: returns at once), reward 1."""

    def __init__(self) -> None:
        self.running = 0
        self.most_running = 0

    def examples(self, split: str = "train", seed: int = 0) -> Iterator[Example]:
        return iter(())

    def get(self, key: str) -> Example:
        if key == "missing":
            raise KeyError(key)
        return Example(key=key, prompt="p", answer="a")

    async def score(self, example: Example, completion: str) -> Reward:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if float(completion):
                await asyncio.sleep(float(completion))
        finally:
            self.running -= 1
        return Reward(1.0, {"correctness": 1.0}, RewardStatus.OK, "", "a")


def _scorer(**config: float) -> tuple[Scorer, Sleepy]:
    texts = {}

    def decode(ids):  # token id i stands for the text registered under it
        return texts[ids[0]]

    scorer = Scorer(ScorerConfig(**config), [], decode)
    env = Sleepy()
    scorer.envs["sleepy"] = env
    scorer.texts = texts  # type: ignore[attr-defined]
    return scorer, env


def _completions(
    scorer: Scorer, delays: list[float], *, key: str = "k"
) -> list[rollout_pb2.RolloutCompletion]:
    out = []
    for i, delay in enumerate(delays):
        scorer.texts[i] = str(delay)  # type: ignore[attr-defined]
        out.append(
            rollout_pb2.RolloutCompletion(
                run_id="r", trajectory_id=f"t{i}", env="sleepy", prompt_key=key, completion_token_ids=[i]
            )
        )
    return out


async def _score(scorer: Scorer, completions: list[rollout_pb2.RolloutCompletion]):
    emitted: dict[int, rollout_pb2.ScoredTrajectory] = {}
    outcomes = await scorer.score_batch(
        completions, lambda i, data: emitted.setdefault(i, rollout_pb2.ScoredTrajectory.FromString(data))
    )
    return outcomes, emitted


async def test_slow_rubrics_overlap_but_never_more_than_max_scoring():
    scorer, env = _scorer(max_scoring=4)
    started = time.monotonic()
    outcomes, emitted = await _score(scorer, _completions(scorer, [0.3] * 12))
    took = time.monotonic() - started
    assert outcomes == [None] * 12 and len(emitted) == 12
    assert env.most_running == 4, f"{env.most_running} rubrics ran at once with max_scoring=4"
    assert took < 1.5, f"12 x 0.3 s in slots of 4 took {took:.1f}s: the lanes did not overlap"


async def test_one_rubric_past_the_timeout_times_out_alone():
    scorer, _ = _scorer(score_timeout_s=0.5, max_scoring=8)
    started = time.monotonic()
    outcomes, emitted = await _score(scorer, _completions(scorer, [0, 0, 30, 0, 0.1, 0]))
    took = time.monotonic() - started
    assert outcomes == [None] * 6
    statuses = [rollout_pb2.RewardStatus.Name(emitted[i].status) for i in range(6)]
    assert statuses == ["REWARD_STATUS_OK"] * 2 + ["REWARD_STATUS_TIMEOUT"] + ["REWARD_STATUS_OK"] * 3
    assert "0.5s" in emitted[2].status_reason
    assert took < 2.0, f"a 0.5 s timeout took {took:.1f}s to fire"
    # the lane that timed out goes on scoring under a fresh deadline
    outcomes, emitted = await _score(scorer, _completions(scorer, [0.2, 0.2]))
    assert {emitted[i].status for i in (0, 1)} == {rollout_pb2.REWARD_STATUS_OK}


async def test_waiting_for_a_slot_does_not_count_against_the_timeout():
    scorer, _ = _scorer(score_timeout_s=0.5, max_scoring=1)
    outcomes, emitted = await _score(scorer, _completions(scorer, [0.3, 0.3, 0.3]))
    assert outcomes == [None] * 3
    assert {emitted[i].status for i in range(3)} == {rollout_pb2.REWARD_STATUS_OK}, (
        "a completion queued 0.6 s behind others was timed out"
    )


async def test_a_completion_that_cannot_be_scored_fails_alone():
    scorer, _ = _scorer()
    good = _completions(scorer, [0, 0])
    bad_key = rollout_pb2.RolloutCompletion(
        run_id="r", trajectory_id="bad", env="sleepy", prompt_key="missing", completion_token_ids=[0]
    )
    outcomes, emitted = await _score(scorer, [good[0], bad_key, good[1]])
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], Reject) and "missing" in str(outcomes[1])
    assert sorted(emitted) == [0, 2]
    assert emitted[0].completion == good[0], "the completion was not carried through unchanged"


class Miscounting(Sleepy):
    """A group rubric with a bug: one reward short for the group it is given."""

    group_reward = True

    async def score_group(self, example: Example, completions: list[str]) -> list[Reward]:
        return [Reward(1.0, {}, RewardStatus.OK, "", "a")] * (len(completions) - 1)


async def test_a_group_rubric_that_fails_answers_every_member_even_in_other_batches():
    # members of one group in two batches: the rubric's bug once left the second batch's member
    # waiting forever (its batch never settled, its ack deadline extended for good)
    scorer, _ = _scorer(group_timeout_s=0.3)
    scorer.envs["sleepy"] = Miscounting()
    first, second = _completions(scorer, [0.0, 0.0])
    for c in (first, second):
        c.group_id, c.group_size = "G", 3  # the third never comes: the group is scored partial
    (_, a), (_, b) = await asyncio.wait_for(
        asyncio.gather(_score(scorer, [first]), _score(scorer, [second])), 10
    )
    for scored in (a[0], b[0]):
        assert scored.status == rollout_pb2.REWARD_STATUS_ERROR
        assert scored.status_reason.count("partial group 2/3") == 1, scored.status_reason
        assert "score_group gave list for 2 completions" in scored.status_reason
