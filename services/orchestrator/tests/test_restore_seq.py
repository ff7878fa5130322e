"""A restarted orchestrator goes on with the run's request numbers and prompts: starting them over
would give two samples of the run one seed and send (and train) the run's first prompts again."""

import asyncio
import contextlib
from types import SimpleNamespace

import pytest
from offbeat_orchestrator.config import OrchestratorConfig
from offbeat_orchestrator.prompts import Mixture
from offbeat_orchestrator.scheduler import Scheduler, _seq_of, request_seed
from orch_helpers import CountingEnv, step, trajectory_rows

from offbeat.bus import Subjects
from offbeat.config import RunSection
from offbeat.testing import wait_for
from offbeat.v1 import rollout_pb2


def _cfg() -> OrchestratorConfig:
    return OrchestratorConfig(tick_s=0.05, stall_timeout_s=600.0, eval_examples=2)


@contextlib.asynccontextmanager
async def running(sched: Scheduler):
    seen: list[rollout_pb2.RolloutRequest] = []

    async def on(req):
        if req.attempt == 0 and not req.eval:
            seen.append(req)

    sub = await sched.bus.subscribe(sched.bus.subjects.rollout_request, rollout_pb2.RolloutRequest, on)
    stop = asyncio.Event()
    task = asyncio.create_task(sched.run(stop))
    try:
        yield seen
    finally:
        stop.set()
        await task
        await sub.unsubscribe()


async def _consume(bus, run_id, n, groups):
    consumed = [t for g in groups for t in g.trajectory_ids]
    await bus.publish(
        bus.subjects.trainer_step, step(run_id, n, consumed=consumed), msg_id=f"step:{n}:{consumed[0]}"
    )


@pytest.mark.integration
async def test_a_restarted_scheduler_goes_on_with_new_seeds_and_the_next_prompts(bus, ledger, writer, run_id):
    run = RunSection(id=run_id, seed=7, group_size=2, groups_per_step=2, max_staleness=0, max_steps=10)
    envs = [("count", 1.0, CountingEnv())]
    first = Scheduler(bus, run, _cfg(), envs, writer=writer)
    async with running(first) as before:
        await wait_for(lambda: len(before) == 2, timeout_s=60)
        await _consume(bus, run_id, 1, before[:2])  # finished: not among the groups restored
        await wait_for(lambda: len(before) == 4, timeout_s=60)
    fresh = Mixture(envs, seed=7)  # a fresh run is unchanged: the mixture's prompts, seeds from 1
    assert [r.prompt_key for r in before] == [fresh.draw()[1].key for _ in before]
    assert [r.sampling.seed for r in before] == [request_seed(7, _seq_of(r.group_id)) for r in before]
    assert sorted(_seq_of(r.group_id) for r in before) == [1, 2, 3, 4]

    async def recorded():
        return len(await trajectory_rows(ledger, run_id)) == 8

    await wait_for(recorded, timeout_s=60)
    second = Scheduler(bus, run, _cfg(), envs, writer=writer, start_step=await ledger.latest_step(run_id))
    assert second.restore(await ledger.unfinished_groups(run_id)) == 2
    async with running(second) as after:
        await _consume(bus, run_id, 2, before[2:])
        await wait_for(lambda: len(after) == 2, timeout_s=60)
    assert min(_seq_of(r.group_id) for r in after) > 4
    used = {r.sampling.seed + i for r in before for i in range(r.n)}
    assert not used & {r.sampling.seed + i for r in after for i in range(r.n)}, "a seed used twice"
    assert [r.prompt_key for r in after] == [fresh.draw()[1].key for _ in after], "prompts not continued"


def _scheduler(**run_fields) -> Scheduler:
    bus = SimpleNamespace(run_id="r", subjects=Subjects("offbeat", "r"))
    run = RunSection(id="r", **({"group_size": 2, "groups_per_step": 1} | run_fields))
    return Scheduler(bus, run, _cfg(), [("a", 1.0, CountingEnv(7)), ("b", 2.0, CountingEnv(5))])  # type: ignore[arg-type]


def test_the_mixture_goes_on_past_prompts_the_difficulty_filter_skipped():
    sent_by = _scheduler(seed=3)
    skip = {("a", "train-2"), ("b", "train-1"), ("b", "train-4")}
    sent = [sent_by.mixture.draw(skip) for _ in range(20)]
    restarted = _scheduler(seed=3)
    restarted._advance_mixture([(env, ex.key) for env, ex in sent])
    nxt = [(env, ex.key) for env, ex in (sent_by.mixture.draw(skip) for _ in range(10))]
    assert [(env, ex.key) for env, ex in (restarted.mixture.draw(skip) for _ in range(10))] == nxt


def test_prompts_the_mixture_never_drew_advance_it_one_draw_per_group():
    restarted = _scheduler(seed=3)
    restarted._advance_mixture([("a", "nowhere")] * 4)
    fresh = _scheduler(seed=3)
    for _ in range(4):
        fresh.mixture.draw()
    assert [restarted.mixture.draw()[1].key for _ in range(5)] == [
        fresh.mixture.draw()[1].key for _ in range(5)
    ]
