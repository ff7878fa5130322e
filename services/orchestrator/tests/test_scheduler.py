"""The scheduler on real NATS + PostgreSQL, driven by publishing what the trainer and inference
would (trainer.step, policy.weights, policy.live, completions) and watching rollout.request."""

import asyncio
import contextlib

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from offbeat_orchestrator.config import OrchestratorConfig
from offbeat_orchestrator.scheduler import Scheduler, request_seed
from orch_helpers import CountingEnv, completion, live, scored, step, trajectory_rows, weights

from offbeat.config import RunSection
from offbeat.ledger.store import RollbackResult
from offbeat.testing import wait_for
from offbeat.v1 import policy_pb2, rollout_pb2

pytestmark = pytest.mark.integration


def _cfg(**fields):
    """Fast rounds; the stall guard off unless a test is about it (so it cannot mask another rule)."""
    return OrchestratorConfig(**({"tick_s": 0.05, "stall_timeout_s": 600.0} | fields))


class LostNotices:
    """Every LOST notice on rollout.scored, by trajectory id."""

    def __init__(self):
        self.seen: dict[str, list[rollout_pb2.ScoredTrajectory]] = {}

    async def on(self, msg):
        if msg.status == rollout_pb2.REWARD_STATUS_LOST:
            self.seen.setdefault(msg.completion.trajectory_id, []).append(msg)


@contextlib.asynccontextmanager
async def lost_notices(bus):
    notices = LostNotices()
    sub = await bus.subscribe(bus.subjects.rollout_scored, rollout_pb2.ScoredTrajectory, notices.on)
    try:
        yield notices
    finally:
        await sub.unsubscribe()


class Requests:
    """Every rollout.request on the bus, as a plain subscription sees it."""

    def __init__(self):
        self.seen: list[rollout_pb2.RolloutRequest] = []

    async def on(self, req):
        self.seen.append(req)

    def groups(self, *, eval_=False):
        return [r for r in self.seen if r.eval == eval_ and r.attempt == 0]


@contextlib.asynccontextmanager
async def running(bus, writer, run: RunSection, cfg: OrchestratorConfig):
    sched = Scheduler(bus, run, cfg, [("count", 1.0, CountingEnv())], writer=writer)
    reqs = Requests()
    sub = await bus.subscribe(bus.subjects.rollout_request, rollout_pb2.RolloutRequest, reqs.on)
    stop = asyncio.Event()
    task = asyncio.create_task(sched.run(stop))
    try:
        yield sched, reqs
    finally:
        stop.set()
        await task
        await sub.unsubscribe()


async def settle(sched, ticks=4):
    """Let the scheduler run a few more rounds (so a dispatch it should not make would happen)."""
    start = sched.ticks
    await wait_for(lambda: sched.ticks >= start + ticks, timeout_s=60)


async def announce(bus, run_id, version, at_step, *, is_live=True):
    await bus.publish(
        bus.subjects.policy_weights,
        weights(run_id, version, at_step, version - 1),
        msg_id=f"weights:{version}",
    )
    if is_live:
        await bus.publish(bus.subjects.policy_live, live(run_id, version), msg_id=f"live:r0:{version}:1")


async def report_step(bus, run_id, n, groups, *, version):
    consumed = [t for g in groups for t in g.trajectory_ids]
    await bus.publish(
        bus.subjects.trainer_step,
        step(run_id, n, consumed=consumed, version=version),
        msg_id=f"step:{n}:{consumed[0]}",
    )


@pytest.mark.slow
async def test_in_flight_groups_never_exceed_the_staleness_budget(bus, writer, run_id):
    G, k, max_steps = 2, 1, 4
    run = RunSection(id=run_id, group_size=2, groups_per_step=G, max_staleness=k, max_steps=max_steps)
    cfg = _cfg()
    async with running(bus, writer, run, cfg) as (sched, reqs):
        await announce(bus, run_id, 0, 0)
        consumed = 0
        for n in range(1, max_steps + 1):
            await wait_for(
                lambda: len(reqs.groups()) >= min(G * max_steps, consumed + G * (k + 1)),  # noqa: B023
                timeout_s=60,
            )
            await settle(sched)
            in_flight = len(reqs.groups()) - consumed
            assert in_flight <= G * (k + 1), (
                f"{in_flight} groups in flight before step {n}; budget {G * (k + 1)}"
            )
            assert in_flight == min(G * (k + 1), G * max_steps - consumed), (
                "dispatch fell short of the budget"
            )
            batch = reqs.groups()[consumed : consumed + G]
            await report_step(bus, run_id, n, batch, version=n)
            await announce(bus, run_id, n, n)
            consumed += G
            await wait_for(lambda: sched.step == n, timeout_s=60)  # noqa: B023
        await settle(sched)
        assert sched.finished
        assert len(reqs.groups()) == G * max_steps, "dispatched past what max_steps needs"
        ids = [t for r in reqs.groups() for t in r.trajectory_ids]
        assert len(ids) == len(set(ids)) == G * max_steps * 2
        assert all(len(r.trajectory_ids) == r.n == 2 for r in reqs.groups())


async def test_max_staleness_zero_waits_for_the_step_and_the_new_version_to_be_live(bus, writer, run_id):
    run = RunSection(id=run_id, group_size=1, groups_per_step=2, max_staleness=0, max_steps=5)
    async with running(bus, writer, run, _cfg()) as (sched, reqs):
        await announce(bus, run_id, 0, 0)
        await wait_for(lambda: len(reqs.groups()) == 2, timeout_s=60)
        await settle(sched)
        assert len(reqs.groups()) == 2, "synchronous RL dispatched more than one step's worth"
        await report_step(bus, run_id, 1, reqs.groups(), version=1)
        await announce(bus, run_id, 1, 1, is_live=False)  # published, not yet served by inference
        await wait_for(lambda: sched.step == 1, timeout_s=60)
        await settle(sched)
        assert len(reqs.groups()) == 2, "dispatched before inference served the new weights"
        await bus.publish(bus.subjects.policy_live, live(run_id, 1), msg_id="live:r0:1:1")
        await wait_for(lambda: len(reqs.groups()) == 4, timeout_s=60)
        await settle(sched)
        assert len(reqs.groups()) == 4


async def test_pause_stops_new_requests_and_resume_continues(bus, writer, run_id):
    run = RunSection(id=run_id, group_size=2, groups_per_step=1, max_staleness=0, max_steps=10)
    async with running(bus, writer, run, _cfg()) as (sched, reqs):
        await announce(bus, run_id, 0, 0)
        await wait_for(lambda: len(reqs.groups()) == 1, timeout_s=60)
        await bus.control(policy_pb2.CONTROL_KIND_PAUSE, command_id="p1", reason="test")
        await wait_for(lambda: sched.paused, timeout_s=30)
        await report_step(bus, run_id, 1, reqs.groups(), version=1)
        await announce(bus, run_id, 1, 1)
        await wait_for(lambda: sched.step == 1 and sched.live_step == 1, timeout_s=60)
        await settle(sched)
        assert len(reqs.groups()) == 1, "a paused scheduler dispatched"
        await bus.control(policy_pb2.CONTROL_KIND_RESUME, command_id="r1", reason="test")
        await wait_for(lambda: len(reqs.groups()) == 2, timeout_s=60)
        assert not sched.paused and not await bus.is_paused()


async def test_a_control_command_of_another_run_or_of_none_is_ignored(bus, writer, run_id):
    run = RunSection(id=run_id, group_size=2, groups_per_step=1, max_staleness=0, max_steps=10)
    async with running(bus, writer, run, _cfg()) as (sched, _reqs):
        for i, other in enumerate(("", "another-run")):
            for kind in (policy_pb2.CONTROL_KIND_PAUSE, policy_pb2.CONTROL_KIND_STOP):
                cmd = policy_pb2.ControlCommand(run_id=other, command_id=f"x{i}{kind}", kind=kind)
                await bus.publish(bus.subjects.control("pause"), cmd, msg_id=f"control:x{i}{kind}")
        await settle(sched, ticks=10)
        assert not sched.paused and not sched.stopped, "obeyed a command that names another run"


async def test_paused_flag_in_kv_holds_a_scheduler_that_starts_late(bus, writer, run_id):
    await bus.control(policy_pb2.CONTROL_KIND_PAUSE, command_id="p0", reason="before start")
    run = RunSection(id=run_id, group_size=1, groups_per_step=1, max_staleness=0, max_steps=3)
    async with running(bus, writer, run, _cfg()) as (sched, reqs):
        await settle(sched)
        assert sched.paused and reqs.seen == []


async def test_timed_out_request_is_reissued_with_the_same_ids_then_failed(bus, ledger, writer, run_id):
    run = RunSection(id=run_id, group_size=2, groups_per_step=2, max_staleness=0, max_steps=3)
    cfg = _cfg(request_timeout_s=1.0, max_attempts=3)
    async with lost_notices(bus) as notices, running(bus, writer, run, cfg) as (_sched, reqs):
        await wait_for(lambda: len(reqs.groups()) == 2, timeout_s=60)
        answered, lost = reqs.groups()
        for i in range(2):  # inference answers the first group only
            c = completion(answered, i)
            await bus.publish(bus.subjects.rollout_completion, c, msg_id=f"completion:{c.trajectory_id}")
        await wait_for(lambda: sum(r.request_id == lost.request_id for r in reqs.seen) == 3, timeout_s=60)
        again = [r for r in reqs.seen if r.request_id == lost.request_id]
        assert [r.attempt for r in again] == [0, 1, 2]
        for r in again:
            assert (r.group_id, list(r.trajectory_ids), r.prompt_key, r.text) == (
                lost.group_id,
                list(lost.trajectory_ids),
                lost.prompt_key,
                lost.text,
            ), "a re-issue changed the request's ids or prompt"
        assert all(r.request_id != answered.request_id for r in reqs.seen if r.attempt > 0)

        async def failed():
            rows = await trajectory_rows(ledger, run_id)
            return [t for t, r in rows.items() if r["status"] == "failed"]

        await wait_for(lambda: _len(failed, 2), timeout_s=60)
        rows = await trajectory_rows(ledger, run_id)
        assert sorted(await failed()) == sorted(lost.trajectory_ids)
        assert "no completion after 3 attempts" in rows[lost.trajectory_ids[0]]["reason"]
        assert {rows[t]["status"] for t in answered.trajectory_ids} == {"generated"}
        # the trainer is told, so nothing waits for them; the ledger keeps the reason it had
        await wait_for(lambda: set(notices.seen) == set(lost.trajectory_ids), timeout_s=60)
        for i, tid in enumerate(lost.trajectory_ids):
            (n,) = notices.seen[tid]
            c = n.completion
            assert (c.group_id, c.group_size, c.sample_index, c.run_id) == (lost.group_id, 2, i, run_id)
            assert "no completion after 3 attempts" in n.status_reason
        await settle(_sched)
        rows = await trajectory_rows(ledger, run_id)
        assert "no completion after 3 attempts" in rows[lost.trajectory_ids[0]]["reason"]
        assert rows[lost.trajectory_ids[0]]["reward"] is None


async def _len(query, n):
    return len(await query()) >= n


async def test_eval_split_is_sent_greedy_at_start_every_eval_every_steps_and_at_the_end(bus, writer, run_id):
    run = RunSection(id=run_id, group_size=2, groups_per_step=1, max_staleness=0, max_steps=3)
    cfg = _cfg(eval_every=2, eval_examples=3)
    async with running(bus, writer, run, cfg) as (sched, reqs):
        await announce(bus, run_id, 0, 0)
        await wait_for(lambda: len(reqs.groups(eval_=True)) == 3, timeout_s=60)
        evals = reqs.groups(eval_=True)
        assert all(
            r.sampling.temperature == 0 and r.n == 1 and r.prompt_key.startswith("eval-") for r in evals
        )
        assert all(r.prompt_key.startswith("train-") for r in reqs.groups())
        expected = {1: 3, 2: 6, 3: 9}  # evals after step n: at 0, at 2 (eval_every), at 3 (max_steps)
        for n in (1, 2, 3):
            await wait_for(lambda: len(reqs.groups()) == n, timeout_s=60)  # noqa: B023
            await report_step(bus, run_id, n, reqs.groups()[n - 1 : n], version=n)
            await announce(bus, run_id, n, n, is_live=False)
            await wait_for(lambda: sched.step == n, timeout_s=60)  # noqa: B023
            await settle(sched)
            assert len(reqs.groups(eval_=True)) == expected[n] - (n != 1) * 3, (
                "eval sent before the version was live"
            )
            await bus.publish(bus.subjects.policy_live, live(run_id, n), msg_id=f"live:r0:{n}:1")
            await wait_for(lambda: len(reqs.groups(eval_=True)) == expected[n], timeout_s=60)  # noqa: B023
        assert [r.prompt_key for r in reqs.groups(eval_=True)[3:6]] == [r.prompt_key for r in evals]
        await settle(sched)
        assert len(reqs.groups(eval_=True)) == 9 and len(reqs.groups()) == 3


async def test_difficulty_filter_skips_prompts_whose_group_was_all_right_or_all_wrong(bus, writer, run_id):
    run = RunSection(id=run_id, group_size=2, groups_per_step=1, max_staleness=0, max_steps=20)
    cfg = _cfg(difficulty_filter=True)
    sched = Scheduler(bus, run, cfg, [("count", 1.0, CountingEnv(n_train=4))], writer=writer)
    reqs = Requests()
    sub = await bus.subscribe(bus.subjects.rollout_request, rollout_pb2.RolloutRequest, reqs.on)
    stop = asyncio.Event()
    task = asyncio.create_task(sched.run(stop))
    try:
        await announce(bus, run_id, 0, 0)
        rewards = {"train-0": (1.0, 1.0), "train-1": (0.0, 0.0)}  # all right, all wrong; others mixed
        for n in range(1, 11):
            await wait_for(lambda: len(reqs.groups()) == n, timeout_s=60)  # noqa: B023
            group = reqs.groups()[-1]
            for i, reward in enumerate(rewards.get(group.prompt_key, (1.0, 0.0))):
                c = completion(group, i)
                await bus.publish(
                    bus.subjects.rollout_scored, scored(c, reward), msg_id=f"scored:{c.trajectory_id}"
                )
            await report_step(bus, run_id, n, [group], version=n)
            await announce(bus, run_id, n, n)
        keys = [r.prompt_key for r in reqs.groups()]
        assert keys.count("train-0") == 1 and keys.count("train-1") == 1, keys
        assert {"train-2", "train-3"} <= set(keys[4:]), keys
        assert sched.skip == {("count", "train-0"), ("count", "train-1")}
    finally:
        stop.set()
        await task
        await sub.unsubscribe()


async def test_a_restarted_scheduler_takes_over_the_groups_in_flight(bus, ledger, writer, run_id):
    run = RunSection(id=run_id, group_size=2, groups_per_step=2, max_staleness=0, max_steps=5)
    async with running(bus, writer, run, _cfg()) as (_, reqs):
        await announce(bus, run_id, 0, 0)
        await wait_for(lambda: len(reqs.groups()) == 2, timeout_s=60)
        first = reqs.groups()
        c = completion(first[0], 0)
        await bus.publish(bus.subjects.rollout_completion, c, msg_id=f"completion:{c.trajectory_id}")

    async def recorded():
        rows = await trajectory_rows(ledger, run_id)
        return len(rows) == 4 and rows[c.trajectory_id]["status"] == "generated"

    await wait_for(recorded, timeout_s=60)
    cfg = _cfg(request_timeout_s=1.0)
    sched = Scheduler(bus, run, cfg, [("count", 1.0, CountingEnv())], writer=writer)
    assert sched.restore(await ledger.unfinished_groups(run_id)) == 2
    assert sched.budget() == 0 and sched.trajectories_in_flight() == 4
    reqs = Requests()
    sub = await bus.subscribe(bus.subjects.rollout_request, rollout_pb2.RolloutRequest, reqs.on)
    stop = asyncio.Event()
    task = asyncio.create_task(sched.run(stop))
    try:
        await wait_for(lambda: len(reqs.seen) >= 2, timeout_s=60)  # both re-issued after the time-out
        await settle(sched)
        assert sorted(r.request_id for r in reqs.seen) == sorted(r.request_id for r in first), (
            "dispatched new groups"
        )
        before = {r.request_id: r for r in first}
        for r in reqs.seen:
            assert r.attempt == 1
            assert (list(r.trajectory_ids), r.prompt_key, r.text) == (
                list(before[r.request_id].trajectory_ids),
                before[r.request_id].prompt_key,
                before[r.request_id].text,
            )
    finally:
        stop.set()
        await task
        await sub.unsubscribe()


async def test_a_restarted_scheduler_re_issues_even_what_its_predecessor_had_re_issued(
    bus, ledger, writer, run_id
):
    # restored groups count attempts from 0 again: with msg ids `request:{id}:{attempt}` the new
    # scheduler's attempt 1 was the one its predecessor had sent, and the server dropped it as a
    # duplicate, so the group waited out a whole time-out (or failed) for nothing
    run = RunSection(id=run_id, group_size=2, groups_per_step=2, max_staleness=0, max_steps=5)
    cfg = _cfg(request_timeout_s=1.0, max_attempts=5)
    async with running(bus, writer, run, cfg) as (_, before):
        await announce(bus, run_id, 0, 0)
        await wait_for(lambda: len({r.request_id for r in before.seen if r.attempt == 1}) == 2, timeout_s=60)
    first = {r.request_id for r in before.seen}
    assert {r.request_id for r in before.seen if r.attempt == 1} == first
    await wait_for(lambda: _len(lambda: trajectory_rows(ledger, run_id), 4), timeout_s=60)
    stream = bus.stream_of("inference")
    since = (await bus.js.stream_info(stream)).state.last_seq
    sched = Scheduler(bus, run, cfg, [("count", 1.0, CountingEnv())], writer=writer)
    assert sched.restore(await ledger.unfinished_groups(run_id)) == 2
    stop = asyncio.Event()
    task = asyncio.create_task(sched.run(stop))
    try:
        # what the stream stored (inference's view), not what a plain subscription sees
        stored = bus.js.pull_subscribe(
            bus.subjects.rollout_request,
            stream=stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=since + 1,
                ack_policy=AckPolicy.NONE,
            ),
        )
        sub, got = await stored, []
        deadline = asyncio.get_running_loop().time() + 20
        while {r.request_id for r in got if r.attempt == 1} != first:
            assert asyncio.get_running_loop().time() < deadline, "a re-issue was dropped as a duplicate"
            with contextlib.suppress(TimeoutError):
                msgs = await sub.fetch(10, timeout=1)
                got += [rollout_pb2.RolloutRequest.FromString(m.data) for m in msgs]
        await sub.unsubscribe()
    finally:
        stop.set()
        await task


async def test_a_version_never_reported_live_delays_dispatch_only_for_live_wait_timeout(bus, writer, run_id):
    run = RunSection(id=run_id, group_size=1, groups_per_step=1, max_staleness=0, max_steps=5)
    cfg = _cfg(live_wait_timeout_s=3.0)
    async with running(bus, writer, run, cfg) as (sched, reqs):
        await wait_for(lambda: len(reqs.groups()) == 1, timeout_s=60)
        await report_step(bus, run_id, 1, reqs.groups(), version=1)  # weights v1 exist; no PolicyLive ever
        await wait_for(lambda: sched.step == 1, timeout_s=60)
        assert sched.lag() == 1 and sched.budget() == 0
        await wait_for(lambda: len(reqs.groups()) == 2, timeout_s=60)


async def test_a_group_generated_too_stale_to_train_does_not_hold_the_budget(bus, writer, run_id):
    """k = 0; v1 never goes live, so after the live wait the next group is generated by v0 and is
    stale: the trainer will drop it without a step, so it must not block the next dispatch."""
    run = RunSection(id=run_id, group_size=2, groups_per_step=1, max_staleness=0, max_steps=5)
    cfg = _cfg(live_wait_timeout_s=0.5)
    async with running(bus, writer, run, cfg) as (sched, reqs):
        await announce(bus, run_id, 0, 0)
        await wait_for(lambda: len(reqs.groups()) == 1, timeout_s=60)
        await report_step(bus, run_id, 1, reqs.groups(), version=1)
        await bus.publish(bus.subjects.policy_weights, weights(run_id, 1, 1, 0), msg_id="weights:1")
        await wait_for(lambda: len(reqs.groups()) == 2, timeout_s=60)
        stale = reqs.groups()[1]
        c = completion(stale, 0, versions=(0,))
        await bus.publish(bus.subjects.rollout_completion, c, msg_id=f"completion:{c.trajectory_id}")
        await wait_for(
            lambda: stale.trajectory_ids[0] not in sched.groups[stale.group_id].pending, timeout_s=60
        )
        await settle(sched)
        assert len(reqs.groups()) == 2, "released a group that may still be trained"
        c = completion(stale, 1, versions=(0,))
        await bus.publish(bus.subjects.rollout_completion, c, msg_id=f"completion:{c.trajectory_id}")
        await wait_for(lambda: len(reqs.groups()) == 3, timeout_s=60)
        assert stale.group_id in sched.groups, "the stale group is still tracked until the trainer reports it"


async def test_groups_the_trainer_will_drop_are_left_out_of_the_budget_only_up_to_one_budget(
    bus, writer, run_id
):
    """k = 0, G = 1; v1 never goes live, so every group comes back stale. The first stale group
    is released (the trainer may need a fresh one), the second is not: a replica stuck on an old
    version must not make the scheduler dispatch as fast as it generates."""
    run = RunSection(id=run_id, group_size=2, groups_per_step=1, max_staleness=0, max_steps=5)
    cfg = _cfg(live_wait_timeout_s=0.5)
    async with running(bus, writer, run, cfg) as (sched, reqs):
        await announce(bus, run_id, 0, 0)
        await wait_for(lambda: len(reqs.groups()) == 1, timeout_s=60)
        await report_step(bus, run_id, 1, reqs.groups(), version=1)
        await bus.publish(bus.subjects.policy_weights, weights(run_id, 1, 1, 0), msg_id="weights:1")
        for n in (2, 3):
            await wait_for(lambda n=n: len(reqs.groups()) >= n, timeout_s=60)
            stale = reqs.groups()[n - 1]
            for i in range(2):
                c = completion(stale, i, versions=(0,))
                await bus.publish(bus.subjects.rollout_completion, c, msg_id=f"completion:{c.trajectory_id}")
        await wait_for(lambda: not any(g.pending for g in sched.groups.values()), timeout_s=60)
        await settle(sched, ticks=10)
        assert len(reqs.groups()) == 3, "kept dispatching groups that can only come back stale"
        assert sched.budget() == 0


async def test_a_dead_lettered_sample_is_announced_lost_and_its_group_still_holds_the_budget(
    bus, ledger, writer, run_id
):
    """A sample dead-lettered before the trainer would leave its siblings buffered there for good:
    the scheduler announces it LOST (the trainer then trains the rest of the group), and the group
    holds the budget until the trainer reports it, as any group it will train."""
    run = RunSection(id=run_id, group_size=2, groups_per_step=1, max_staleness=0, max_steps=5)
    async with lost_notices(bus) as notices, running(bus, writer, run, _cfg()) as (sched, reqs):
        await announce(bus, run_id, 0, 0)
        await wait_for(lambda: len(reqs.groups()) == 1, timeout_s=60)
        group = reqs.groups()[0]
        c = completion(group, 0)
        letter = policy_pb2.DeadLetter(
            subject=bus.subjects.rollout_completion,
            payload=c.SerializeToString(),
            reason="rubric crashed",
            consumer="scorer",
            deliveries=5,
            msg_id=f"completion:{c.trajectory_id}",
            dead_at=1.0,
        )
        await bus.publish(bus.subjects.dlq, letter, msg_id="dlq:scorer:1")
        await wait_for(lambda: c.trajectory_id in notices.seen, timeout_s=60)
        (notice,) = notices.seen[c.trajectory_id]
        assert notice.completion.group_id == group.group_id and notice.completion.group_size == 2
        assert notice.status_reason == "dead letter from scorer: rubric crashed"
        rows = await trajectory_rows(ledger, run_id)
        assert (rows[c.trajectory_id]["status"], rows[c.trajectory_id]["reason"]) == (
            "failed",
            "dead letter from scorer: rubric crashed",
        )
        await settle(sched)
        assert len(reqs.groups()) == 1 and sched.budget() == 0, "the rest of the group will be trained"
        await report_step(bus, run_id, 1, [group], version=0)
        await wait_for(lambda: len(reqs.groups()) == 2, timeout_s=60)
        assert set(notices.seen) == {c.trajectory_id}


async def test_a_restarted_scheduler_announces_the_failed_samples_of_the_groups_it_takes_over(
    bus, ledger, writer, run_id
):
    """The scheduler that recorded a sample failed may die before its LOST notice went out."""
    run = RunSection(id=run_id, group_size=2, groups_per_step=1, max_staleness=0, max_steps=5)
    async with running(bus, writer, run, _cfg()) as (_, reqs):
        await wait_for(lambda: len(reqs.groups()) == 1, timeout_s=60)
    group = reqs.groups()[0]
    failed, open_ = group.trajectory_ids
    await wait_for(lambda: _len(lambda: trajectory_rows(ledger, run_id), 2), timeout_s=60)
    await ledger.upsert_trajectories(
        [{"run_id": run_id, "trajectory_id": failed, "status": "failed", "reason": "dead letter from x: y"}]
    )
    sched = Scheduler(bus, run, _cfg(), [("count", 1.0, CountingEnv())], writer=writer)
    assert sched.restore(await ledger.unfinished_groups(run_id)) == 1
    async with lost_notices(bus) as notices:
        await sched.tick()
        await wait_for(lambda: failed in notices.seen, timeout_s=60)
        assert open_ not in notices.seen
        assert notices.seen[failed][0].status_reason == "dead letter from x: y"


async def test_a_stalled_trainer_gets_one_more_step_of_groups_and_no_more(bus, writer, run_id):
    """The trainer drops a group with nothing trainable and reports it only with its next step;
    if that group held the whole budget, the run would deadlock. After the stall timeout one
    more step's worth goes out, never more than that."""
    run = RunSection(id=run_id, group_size=2, groups_per_step=1, max_staleness=0, max_steps=5)
    cfg = _cfg(stall_timeout_s=1.0)
    async with running(bus, writer, run, cfg) as (sched, reqs):
        await announce(bus, run_id, 0, 0)
        await wait_for(lambda: len(reqs.groups()) == 1, timeout_s=60)
        first = reqs.groups()[0]
        await settle(sched)
        assert len(reqs.groups()) == 1, "over budget while inference still owed completions"
        for i in range(2):  # both samples right: zero advantage, the trainer drops the group silently
            c = completion(first, i)
            await bus.publish(bus.subjects.rollout_scored, scored(c, 1.0), msg_id=f"scored:{c.trajectory_id}")
        await wait_for(lambda: len(reqs.groups()) == 2, timeout_s=60)
        assert sched.stall_topups == 1
        second = reqs.groups()[1]
        for i in range(2):
            c = completion(second, i)
            await bus.publish(
                bus.subjects.rollout_scored, scored(c, float(i)), msg_id=f"scored:{c.trajectory_id}"
            )
        start = sched.ticks
        await wait_for(lambda: sched.ticks >= start + 60, timeout_s=120)  # > 1 s of rounds
        assert len(reqs.groups()) == 2, "dispatched more than one step's worth beyond the bound"
        await bus.publish(
            bus.subjects.trainer_step,
            step(
                run_id,
                1,
                consumed=list(second.trajectory_ids),
                dropped=[(t, "zero_advantage") for t in first.trajectory_ids],
                version=1,
            ),
            msg_id="step:1:x",
        )
        await announce(bus, run_id, 1, 1)
        await wait_for(lambda: len(reqs.groups()) == 3, timeout_s=60)
        await settle(sched)
        assert len(reqs.groups()) == 3 and sched.train_groups_in_flight() == 1


@pytest.mark.parametrize(
    ("statuses", "rewards", "zero_advantage_dropped", "released"),
    [
        (("sandbox_error", "timeout"), (0.0, 0.0), False, True),  # masked: nothing to train
        (("parse_error", "parse_error"), (0.0, 0.0), False, False),  # judged: trained (as zeros)
        (("ok", "ok"), (1.0, 1.0), True, True),  # zero advantage, and the trainer filters it
        (("ok", "ok"), (1.0, 1.0), False, False),
        (("ok", "sandbox_error"), (1.0, 0.0), True, True),  # one judged member: zero advantage
    ],
)
async def test_a_group_the_trainer_will_drop_by_its_rewards_stops_holding_the_budget(
    bus, writer, run_id, statuses, rewards, zero_advantage_dropped, released
):
    run = RunSection(id=run_id, group_size=2, groups_per_step=1, max_staleness=0, max_steps=5)
    sched = Scheduler(
        bus,
        run,
        _cfg(),
        [("count", 1.0, CountingEnv())],
        writer=writer,
        zero_advantage_dropped=zero_advantage_dropped,
    )
    reqs = Requests()
    sub = await bus.subscribe(bus.subjects.rollout_request, rollout_pb2.RolloutRequest, reqs.on)
    stop = asyncio.Event()
    task = asyncio.create_task(sched.run(stop))
    try:
        await wait_for(lambda: len(reqs.groups()) == 1, timeout_s=60)
        group = reqs.groups()[0]
        for i, (status, reward) in enumerate(zip(statuses, rewards, strict=True)):
            c = completion(group, i)
            value = rollout_pb2.RewardStatus.Value(f"REWARD_STATUS_{status.upper()}")
            await bus.publish(
                bus.subjects.rollout_scored, scored(c, reward, value), msg_id=f"scored:{c.trajectory_id}"
            )
        await wait_for(lambda: len(sched.groups[group.group_id].rewards) == 2, timeout_s=60)
        if released:
            await wait_for(lambda: len(reqs.groups()) == 2, timeout_s=60)
        else:
            await settle(sched)
            assert len(reqs.groups()) == 1, "released a group the trainer will train"
    finally:
        stop.set()
        await task
        await sub.unsubscribe()


async def test_after_a_rollback_a_group_generated_by_a_rolled_back_version_stops_holding_the_budget(
    bus, writer, run_id
):
    run = RunSection(id=run_id, group_size=2, groups_per_step=1, max_staleness=0, max_steps=5)
    async with running(bus, writer, run, _cfg()) as (sched, reqs):
        await announce(bus, run_id, 0, 0)
        await wait_for(lambda: len(reqs.groups()) == 1, timeout_s=60)
        await report_step(bus, run_id, 1, reqs.groups(), version=1)
        await announce(bus, run_id, 1, 1)
        await wait_for(lambda: len(reqs.groups()) == 2, timeout_s=60)
        late = reqs.groups()[1]
        # what the admin API does after the ledger rolled back to v0
        sched.rolled_back(RollbackResult(version=0, step=0, versions=[1], trajectory_ids=[], steps=1))
        assert sched.step == 0
        await settle(sched)
        assert len(reqs.groups()) == 2
        for i in range(2):  # inference was still on v1 when it generated these
            c = completion(late, i, versions=(1,))
            await bus.publish(bus.subjects.rollout_completion, c, msg_id=f"completion:{c.trajectory_id}")
        await wait_for(lambda: len(reqs.groups()) == 3, timeout_s=60)


def test_no_two_samples_of_a_run_share_a_sampling_seed():
    # sample i of a request is seeded request seed + i (inference): requests must be spaced apart
    n = 64
    seeds = [request_seed(0, s) + i for s in range(1, 2001) for i in range(n)]
    assert len(set(seeds)) == len(seeds), "two samples of one run drew the same random numbers"
    assert request_seed(0, 1) != request_seed(1, 1)
    assert all(0 <= request_seed(r, 2**20) < 2**63 for r in (0, 7, -3, 2**40)), "seed outside int64"
