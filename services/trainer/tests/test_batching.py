"""Groups, staleness, masked failed rewards, advantages and packing."""

from __future__ import annotations

import pytest
import torch
from offbeat_trainer.batching import GroupBuffer, Trajectory, group_advantages
from offbeat_trainer.packing import pack, plan
from offbeat_trainer.train import completion_logprobs, load_model


def traj(
    tid: str,
    gid: str,
    reward: float,
    *,
    version: int = 0,
    status: str = "ok",
    size: int = 3,
    p: int = 4,
    c: int = 3,
) -> Trajectory:
    return Trajectory(
        tid,
        gid,
        size,
        list(range(5, 5 + p)),
        list(range(40, 40 + c)),
        [-1.0] * c,
        reward,
        status,
        version,
        versions=frozenset({version}),
    )


def take(buf: GroupBuffer, step: int, *, max_staleness: int = 1, groups: int = 1, filt: bool = False):  # type: ignore[no-untyped-def]
    return buf.take_step(
        step=step,
        version_steps={0: 0, 1: 1, 2: 2},
        max_staleness=max_staleness,
        groups_per_step=groups,
        std_normalize=False,
        filter_zero_advantage=filt,
    )


def test_incomplete_group_is_not_trained():
    buf = GroupBuffer()
    buf.add(traj("a", "g", 1.0))
    buf.add(traj("b", "g", 0.0))
    batch = take(buf, 0)
    assert batch.samples == [] and batch.dropped == [] and len(buf) == 2


def test_failed_reward_is_masked_out_of_group_mean_and_reported():
    buf = GroupBuffer()
    buf.add(traj("a", "g", 1.0))
    buf.add(traj("b", "g", 0.0))
    buf.add(traj("c", "g", 0.0, status="timeout"))
    batch = take(buf, 0)
    assert [t.trajectory_id for t in batch.samples] == ["a", "b"]
    assert [t.advantage for t in batch.samples] == [0.5, -0.5]  # mean over a, b only
    assert [(d.trajectory_id, d.reason) for d in batch.dropped] == [("c", "reward_failed:timeout")]


def test_parse_error_is_a_judgement_and_is_trained():
    """No parseable answer is the policy's fault: it earns its (zero) reward, which teaches the format."""
    buf = GroupBuffer()
    buf.add(traj("a", "g", 1.0))
    buf.add(traj("b", "g", 0.0, status="parse_error"))
    buf.add(traj("c", "g", 0.0, status="sandbox_error"))
    batch = take(buf, 0)
    assert [t.trajectory_id for t in batch.samples] == ["a", "b"]
    assert [t.advantage for t in batch.samples] == [0.5, -0.5]
    assert [(d.trajectory_id, d.reason) for d in batch.dropped] == [("c", "reward_failed:sandbox_error")]


def test_staleness_uses_oldest_version_and_step_being_trained():
    buf = GroupBuffer()
    buf.add(traj("a", "g", 1.0, version=0))
    buf.add(traj("b", "g", 0.0, version=1))
    buf.add(traj("c", "g", 0.5, version=2))
    batch = take(buf, 2, max_staleness=1)  # update 2 -> 3: lags 2, 1, 0
    assert [(d.trajectory_id, d.reason, d.staleness) for d in batch.dropped] == [("a", "stale", 2)]
    assert batch.staleness == {"b": 1, "c": 0}


def test_fully_dropped_group_does_not_count_towards_a_step():
    buf = GroupBuffer()
    for k in range(3):
        buf.add(traj(f"s{k}", "old", 1.0, version=0))
    batch = take(buf, 5, max_staleness=1)
    assert batch.samples == [] and len(batch.dropped) == 3 and len(buf) == 0


def test_a_member_dropped_on_arrival_does_not_hold_its_group_back():
    """The trainer drops a member that arrives too stale at once; its group must still complete
    (the rest trained, advantages over them), or it waits forever, holding the scheduler's budget."""
    buf = GroupBuffer()
    buf.add(traj("a", "g", 1.0))
    buf.depart("g", "late", 3)
    assert take(buf, 0).samples == []  # 2 of 3 accounted for: still incomplete
    buf.add(traj("b", "g", 0.0))
    batch = take(buf, 0)
    assert [(t.trajectory_id, t.advantage) for t in batch.samples] == [("a", 0.5), ("b", -0.5)]
    assert batch.dropped == [] and len(buf) == 0 and not buf.departed and not buf.sizes


def test_a_group_whose_every_member_departed_is_forgotten_without_a_second_report():
    buf = GroupBuffer()
    for k in range(3):
        buf.depart("gone", f"d{k}", 3)
    buf.add(traj("x", "next", 1.0))
    assert take(buf, 0).dropped == []
    assert list(buf.groups) == ["next"] and not buf.departed


def test_departures_survive_a_restart_through_the_checkpoint_state():
    """What a checkpoint records of departures gives a fresh buffer the same groups: after a
    restart, the departed member's message is acked and never comes back, its siblings do."""
    from offbeat_trainer.checkpoint import TrainerState

    buf = GroupBuffer()
    buf.add(traj("a", "g", 1.0))
    buf.depart("g", "lost", 3)
    state = TrainerState.from_json(TrainerState(departed=buf.departures()).to_json())
    assert state.departed == {"g": (3, ["lost"])}
    fresh = GroupBuffer()
    fresh.restore(state.departed)
    fresh.add(traj("a", "g", 1.0))
    fresh.add(traj("b", "g", 0.0))
    assert [t.trajectory_id for t in take(fresh, 0).samples] == ["a", "b"]
    assert TrainerState.from_json('{"versions": {}}').departed == {}, "a checkpoint from before departures"


def test_a_departure_reported_after_its_group_was_taken_starts_no_group():
    """A LOST notice may come for a member the trainer refused long ago, after the rest of its
    group was trained: it must not leave a group behind that can never complete."""
    buf = GroupBuffer()
    buf.depart("g", "refused", 3)
    buf.add(traj("a", "g", 1.0))
    buf.add(traj("b", "g", 0.0))
    assert len(take(buf, 0).samples) == 2
    buf.depart("g", "refused", 3)
    assert not buf.groups and not buf.departed and buf.departures() == {}


def test_members_removed_by_a_rollback_leave_the_rest_of_their_group_trainable():
    buf = GroupBuffer()
    buf.add(traj("a", "g", 1.0, version=0))
    buf.add(traj("b", "g", 0.0, version=2))
    buf.add(traj("c", "g", 0.0, version=0))
    removed = buf.remove_where(lambda t: 2 in t.versions)
    assert [t.trajectory_id for t in removed] == ["b"] and "b" not in buf
    batch = take(buf, 0)
    assert [(t.trajectory_id, t.advantage) for t in batch.samples] == [("a", 0.5), ("c", -0.5)]


def test_zero_advantage_filter():
    buf = GroupBuffer()
    for k in range(3):
        buf.add(traj(f"z{k}", "flat", 1.0))
    batch = take(buf, 0, filt=True)
    assert batch.samples == [] and {d.reason for d in batch.dropped} == {"zero_advantage"}


def test_std_normalisation():
    assert group_advantages([1.0, 0.0], std_normalize=True) == pytest.approx([1.0, -1.0], abs=1e-5)


def test_plan_respects_budget_and_keeps_every_sequence():
    lengths = [5, 9, 3, 7, 2, 12, 4]
    bins = plan(lengths, 12)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 12 for b in bins)
    assert plan([20], 8) == [[0]]  # longer than the budget: a micro-batch of its own


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_micro_batch_logprobs_equal_one_sequence_at_a_time(tiny_model, layout):  # type: ignore[no-untyped-def]
    model = load_model(str(tiny_model))
    samples = [traj(f"t{i}", "g", 0.0, p=3 + i, c=2 + 2 * i) for i in range(5)]
    micro = pack(samples, budget=10_000, normalize="token", layout=layout)
    assert len(micro) == 1 and micro[0].num_sequences == 5
    if layout == "padded":
        assert micro[0].input_ids.shape[0] == 5 and micro[0].attention_mask is not None
    with torch.no_grad():
        lp, _ = completion_logprobs(model, micro[0], temperature=1.0)
        order = sorted(range(5), key=lambda i: -samples[i].num_tokens)
        single = torch.cat(
            [
                completion_logprobs(
                    model, pack([samples[i]], budget=10_000, normalize="token")[0], temperature=1.0
                )[0]
                for i in order
            ]
        )
    assert (lp - single).abs().max().item() < 1e-5, f"{layout}: sequences leak into each other"


def test_a_group_sharing_its_prompt_in_one_row_gives_each_sample_its_own_logprobs(tiny_model):  # type: ignore[no-untyped-def]
    model = load_model(str(tiny_model))
    samples = []
    for g, (p, lengths) in enumerate([(5, (1, 3, 4, 2)), (3, (6, 2)), (7, (2,))]):
        for k, c in enumerate(lengths):  # siblings' completions differ: a leak between them shows
            t = traj(f"g{g}-{k}", f"g{g}", 0.0, p=p, c=c)
            t.completion_ids = [40 + 7 * k + j for j in range(c)]
            t.advantage = 0.5 - k
            samples.append(t)
    micro = pack(samples, budget=10_000, normalize="sequence", layout="shared_prompt")
    assert len(micro) == 1 and micro[0].num_sequences == len(samples)
    assert micro[0].input_ids.shape[0] == 3, "one row per group"
    assert micro[0].num_tokens == (5 + 10) + (3 + 8) + (7 + 2), "a group's prompt is computed once"
    with torch.no_grad():
        shared, _ = completion_logprobs(model, micro[0], temperature=0.8)
        alone = [
            completion_logprobs(model, pack([t], budget=10_000, normalize="token")[0], temperature=0.8)[0]
            for t in samples
        ]
    expected = torch.cat(alone)  # rows by size (longest first: as listed), samples in group order
    assert (shared - expected).abs().max().item() < 1e-5, "a completion sees more than its prompt and itself"
    per_sample = pack(samples, budget=10_000, normalize="sequence", layout="padded")[0]
    assert torch.sort(micro[0].weights * micro[0].advantages).values.allclose(
        torch.sort(per_sample.weights * per_sample.advantages).values
    )


def test_temperature_scales_logits(tiny_model):  # type: ignore[no-untyped-def]
    model = load_model(str(tiny_model))
    mb = pack([traj("a", "g", 0.0)], budget=100, normalize="token")[0]
    with torch.no_grad():
        out = model(input_ids=mb.input_ids, use_cache=False).logits[0, mb.logit_index]
        expected = torch.log_softmax(out / 0.7, -1).gather(-1, mb.targets[:, None]).squeeze(-1)
        got, _ = completion_logprobs(model, mb, temperature=0.7)
    assert torch.allclose(got, expected, atol=1e-6)


def test_padded_rows_respect_budget():
    samples = [traj(f"t{i}", "g", 0.0, p=4, c=2 + 3 * i) for i in range(8)]
    micro = pack(samples, budget=64, normalize="token", layout="padded")
    assert sum(m.num_sequences for m in micro) == 8
    assert all(m.input_ids.numel() <= 64 or m.num_sequences == 1 for m in micro)


def test_sequence_normalisation_weights():
    samples = [traj("a", "g", 0.0, c=2), traj("b", "g", 0.0, c=4)]
    mb = pack(samples, budget=100, normalize="sequence")[0]
    assert sorted(set(mb.weights.tolist())) == pytest.approx([1 / 8, 1 / 4])
    assert mb.weights.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda m: m.completion.prompt_token_ids.append(300), "prompt token id 300 is outside"),
        (lambda m: m.completion.completion_token_ids.__setitem__(0, -1), "completion token id -1 is outside"),
        (lambda m: setattr(m, "reward", float("nan")), "reward nan is not a number"),
        (lambda m: m.completion.logprobs.__setitem__(1, float("-inf")), "log-prob is not a finite"),
        (lambda m: m.completion.logprobs.__setitem__(1, 0.5), "log-prob 0.5 is above 0"),
    ],
)
def test_a_trajectory_that_would_crash_the_step_or_poison_the_weights_is_refused(change, why, make_scored):  # type: ignore[no-untyped-def]
    # found by the fuzz suite: one such sample in a batch crashes the step (embedding lookup) or
    # makes the loss and then every weight NaN; refused at intake, it is dead-lettered instead
    msg = make_scored("r", "t-0", "g", group_size=1, reward=1.0)
    assert Trajectory.from_scored(msg, vocab_size=256).trajectory_id == "t-0"
    change(msg)
    with pytest.raises(ValueError, match=why):
        Trajectory.from_scored(msg, vocab_size=256)


def test_a_logprob_of_zero_within_float_rounding_is_accepted(make_scored):  # type: ignore[no-untyped-def]
    msg = make_scored("r", "t-0", "g", group_size=1, reward=1.0)
    msg.completion.logprobs[0], msg.completion.logprobs[1] = 0.0, 5e-4
    assert Trajectory.from_scored(msg, vocab_size=256).inference_logprobs[:2] == pytest.approx([0.0, 5e-4])
