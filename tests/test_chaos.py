"""Chaos: a real run survives its services being SIGKILLed and its servers restarting under it.

`offbeat run` runs all five services on a nats-server and a PostgreSQL this module owns. In turn:
SIGKILL inference, scorer, sandbox, trainer and orchestrator (each waited for: the launcher
restarts it and the run makes progress again), then restart nats-server and PostgreSQL (crash
stop, WAL recovery), after which no service may have been restarted: they reconnect by
themselves. The run must reach max_steps, and the audit (`harness.audit`) must find every
requested trajectory in exactly one bucket: terminal, or in flight at stop with a message still in
the stream; none lost, none trained twice.

The environment scores every completion by running a program in the sandbox (`sandbox_echo` from
tests/envpkg), so killing the sandbox costs judgements (`failed: reward_failed:sandbox_error`),
never a silent zero. The full suite runs under `make chaos` (deselected from the default run); a
smoke variant (SIGKILL the trainer, restart nats-server) runs by default, and so does a poison
message: completions whose scoring kills the scorer every time (`poison_echo`).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import LiveRun, audit, query, write_config

from offbeat.infra import NatsServer, PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECOVERY_S = 240.0
"""Longest a disruption may stall the run (restart + ack_wait redelivery + a step or two)."""


@pytest.fixture(scope="module")
def own_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, PostgresServer]]:
    """A nats-server and a PostgreSQL for this module alone: the test restarts them."""
    from offbeat.ledger import upgrade

    root = tmp_path_factory.mktemp("chaos-infra")
    nats = NatsServer.start(root, max_file_store_bytes=1024**4)
    # durable, as `offbeat run` starts it: the test crashes it, and with asynchronous commit (the
    # session fixture's setting) commits acknowledged just before a crash are lost by design
    pg = PostgresServer.start(root, durable=True)
    upgrade(pg.url)
    yield nats, pg
    nats.stop()
    pg.destroy()


def chaos(
    tmp_path: Path,
    servers: tuple[NatsServer, PostgresServer],
    envpkg: Path,
    run_id: str,
    *,
    killed: tuple[str, ...],
    restarted: tuple[str, ...],
    max_steps: int,
) -> None:
    nats, pg = servers
    config = write_config(tmp_path, run_id, max_steps=max_steps)
    sets = (
        "bus.ack_wait_s=10.0",
        "inference.heartbeat_s=2.0",
        "orchestrator.request_timeout_s=90.0",
    )
    restart = {"nats-server": nats.restart, "postgresql": lambda: pg.restart(mode="immediate")}
    started = time.monotonic()
    run = LiveRun(config, run_id=run_id, nats_url=nats.url, database_url=pg.url, pythonpath=envpkg, sets=sets)
    timeline: list[str] = []

    def recovered(step: int, at: float, what: str) -> None:
        """The run trains again (two more steps) and its rubric runs again (a judged score)."""
        run.wait(lambda: run.step() >= step + 2, timeout_s=RECOVERY_S, what=f"progress after {what}")
        run.wait(lambda: run.scored_ok_since(at), timeout_s=RECOVERY_S, what=f"a judged score after {what}")
        timeline.append(f"{what} at step {step}: recovered at step {run.step()}")

    def live() -> int:
        """The step to inject the next fault at: two steps must be left to recover in (the last
        fault's recovery may take the run to its end; a score after it shows it recovered)."""
        step = run.step()
        assert step + 2 <= max_steps, f"the run ended before the chaos did: {timeline}"
        return step

    try:
        run.wait(lambda: run.step() >= 2, timeout_s=300, what="step 2")
        run.wait(lambda: len(run.pids()) == 5, timeout_s=60, what="five services")
        for service in killed:
            old, step, at = run.pid(service), live(), time.time()
            assert old is not None, f"no {service} process: {run.pids()}"
            os.kill(old, signal.SIGKILL)
            run.wait(
                lambda s=service, o=old: run.pid(s) not in (None, o), timeout_s=60, what=f"{service} back"
            )
            recovered(step, at, f"SIGKILL {service}")
        for server in restarted:
            before, step, at = run.pids(), live(), time.time()
            restart[server]()
            recovered(step, at, f"restarting {server}")
            assert run.pids() == before, (
                f"services were restarted after {server} restarted (they must reconnect by themselves): "
                f"{before} -> {run.pids()}; {run.restarts()}"
            )
        rc = run.finish(timeout_s=600)
        assert rc == 0, run.output()[-6000:]
    finally:
        run.stop()
    wall_s = time.monotonic() - started
    restarts = run.restarts()
    assert [line.split("] ", 1)[1].split(" exited")[0] for line in restarts] == list(killed), restarts
    result = audit(run)
    counts = result.counts() | {"wall_s": round(wall_s, 1), "timeline": timeline}
    print("chaos counts:", json.dumps(counts, indent=2))
    assert result.steps == list(range(1, max_steps + 1)), f"steps in the ledger: {result.steps}"
    assert not result.unrequested, f"ledger rows no request named: {result.details['unrequested']}"
    result.check_balanced()


def test_a_killed_trainer_and_a_restarted_nats_server_smoke(tmp_path, own_servers, envpkg, run_id):
    chaos(
        tmp_path, own_servers, envpkg, run_id, killed=("trainer",), restarted=("nats-server",), max_steps=20
    )


@pytest.mark.chaos
def test_run_survives_killed_services_and_restarted_servers(tmp_path, own_servers, envpkg, run_id):
    chaos(
        tmp_path,
        own_servers,
        envpkg,
        run_id,
        killed=("inference", "scorer", "sandbox", "trainer", "orchestrator"),
        restarted=("nats-server", "postgresql"),
        max_steps=60,
    )


def test_a_completion_that_kills_the_scorer_every_time_is_dead_lettered_and_its_group_is_not_waited_for(
    tmp_path, own_servers, envpkg, run_id
):
    """A poison message: scoring any completion of one prompt kills the scorer's process (no
    exception, so the bus's own dead-lettering of failing handlers never sees it). After
    `max_deliver` deliveries the server stops delivering such a completion and only says so in an
    advisory; the orchestrator dead-letters it from there, the ledger has it `failed` with the
    reason, and nothing waits for it: the run reaches max_steps with every trajectory accounted
    for. (Other completions the scorer held when it died may share that fate: collateral of a
    poison message, accounted for the same way.)"""
    from offbeat_testenv import PoisonEcho

    nats, pg = own_servers
    max_steps = 10
    config = write_config(
        tmp_path,
        run_id,
        max_steps=max_steps,
        envs='name = "poison_echo"\nargs = { size = 200, poison_index = 3 }',
    )
    sets = (
        "bus.max_deliver=2",
        "bus.ack_wait_s=5.0",
        "launcher.max_restarts=10",
        "inference.heartbeat_s=1.0",
    )
    run = LiveRun(config, run_id=run_id, nats_url=nats.url, database_url=pg.url, pythonpath=envpkg, sets=sets)
    try:
        rc = run.finish(timeout_s=600)
        assert rc == 0, run.output()[-6000:]
    finally:
        run.stop()
    restarts = run.restarts()
    assert restarts and all("scorer exited 70" in line for line in restarts), restarts
    poisoned = query(
        pg.url,
        "SELECT trajectory_id, status, reason FROM trajectories WHERE run_id=%s AND prompt_key=%s AND NOT eval",
        run_id,
        PoisonEcho(size=200, poison_index=3).poison_key,
    )
    assert len(poisoned) == 4, poisoned
    for tid, status, reason in poisoned:
        assert status == "failed" and "delivered 2 times and never acked" in reason, (tid, status, reason)
    result = audit(run)
    print("poison counts:", json.dumps(result.counts() | {"restarts": len(restarts)}, indent=2))
    assert result.steps == list(range(1, max_steps + 1)), f"steps in the ledger: {result.steps}"
    result.check_balanced()
