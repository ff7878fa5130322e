"""The scorer service, started from its console script on a real nats-server, with a real
(tiny, locally built) tokenizer: completions in on rollout.completion, rewards out on rollout.scored."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nats.errors
import pytest

from offbeat.infra import free_port
from offbeat.testing import wait_for
from offbeat.tinymodel import build_tokenizer
from offbeat.v1 import policy_pb2, rollout_pb2

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
ENVPKG = Path(__file__).parents[3] / "tests" / "envpkg"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def envpkg_site(tmp_path_factory):
    """The test package with an entry-point environment (group reward), pip-installed to a tmp dir."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "envpkg"
    shutil.copytree(ENVPKG, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return target


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def start_scorer(config_file, *, envpkg_site, nats_url, run_id, sets=()):
    """Start offbeat-scorer; returns (process, health port) once it reports healthy."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(envpkg_site), os.environ.get("PYTHONPATH", "")])}
    args = [
        str(BIN / "offbeat-scorer"),
        "--config",
        str(config_file),
        "--nats-url",
        nats_url,
        "--set",
        f"run.id={run_id}",
        "--set",
        f"scorer.health_port={port}",
    ]
    for item in sets:
        args += ["--set", item]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while _get(f"http://127.0.0.1:{port}/healthz")[0] != 200:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "scorer did not become healthy"
        time.sleep(0.2)
    return proc, port


def stop_scorer(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, proc.stdout.read().decode()[-3000:]


@pytest.fixture
def scorer_config(service_config_file, tokenizer_dir):
    with service_config_file.open("a") as f:
        f.write(
            f'[model]\npath = "{tokenizer_dir}"\n'
            '[[envs]]\nname = "reasoning_gym:basic_arithmetic"\n'
            '[[envs]]\nname = "math"\n'
            '[[envs]]\nname = "echo_number"\n'
            '[[envs]]\nname = "slow_echo"\nargs = { delay_s = 5.0 }\n'
            '[[envs]]\nname = "code"\nargs = { timeout_s = 2.0, retries = 1 }\n'
            "[scorer]\nmax_in_flight = 32\ngroup_timeout_s = 30.0\nrate_window_s = 60.0\n"
            'sandbox_subject = "nosandbox.sandbox.exec"\n'
        )
    return service_config_file


@pytest.fixture
def scorer(bus, scorer_config, envpkg_site, nats_url, run_id):
    """A running offbeat-scorer for the test's run; yields its health port. (It depends on `bus` so
    that it is stopped before the bus fixture deletes the run's stream.)"""
    proc, port = start_scorer(scorer_config, envpkg_site=envpkg_site, nats_url=nats_url, run_id=run_id)
    yield port
    stop_scorer(proc)


def completion(run_id, tokenizer, *, env, key, text, group="g", size=1, index=0, eval=False):
    ids = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    return rollout_pb2.RolloutCompletion(
        run_id=run_id,
        trajectory_id=f"t-{uuid.uuid4().hex[:12]}",
        request_id="r",
        group_id=group,
        env=env,
        prompt_key=key,
        sample_index=index,
        group_size=size,
        prompt_token_ids=[1, 2, 3],
        completion_token_ids=ids,
        logprobs=[-0.5] * len(ids),
        finish_reason="stop",
        eval=eval,
        finished_at=time.time(),
    )


async def collect(bus, n, *, timeout_s=120.0):
    """Pull n scored trajectories from the trainer's consumer; {trajectory_id: (msg id, message)}."""
    sub = await bus._pull("trainer")
    got = {}

    async def more():
        try:
            msgs = await sub.fetch(64, timeout=0.5)
        except (TimeoutError, nats.errors.TimeoutError):  # nothing there yet
            return len(got) >= n
        for msg in msgs:
            scored = rollout_pb2.ScoredTrajectory.FromString(msg.data)
            assert scored.completion.trajectory_id not in got, "a trajectory was delivered twice"
            got[scored.completion.trajectory_id] = (msg.headers["Nats-Msg-Id"], scored)
            await msg.ack_sync()
        return len(got) >= n

    await wait_for(more, timeout_s=timeout_s, interval_s=0.01)
    await sub.unsubscribe()
    return got


async def _drained(bus, consumer):
    return await bus.consumer_pending(consumer) == (0, 0)


async def test_scores_publishes_and_reports(scorer, bus, run_id, tokenizer):
    from offbeat.envs import load

    arith = load("reasoning_gym:basic_arithmetic")
    cases = []  # (completion, expected reward, expected status)
    for i in range(20):
        ex = arith.get(f"train:{i}")
        cases.append(
            (
                completion(
                    run_id,
                    tokenizer,
                    env="reasoning_gym:basic_arithmetic",
                    key=ex.key,
                    text=f"<think>sum</think><answer>{ex.answer}</answer>",
                ),
                1.0,
                rollout_pb2.REWARD_STATUS_OK,
            )
        )
        cases.append(
            (
                completion(
                    run_id,
                    tokenizer,
                    env="reasoning_gym:basic_arithmetic",
                    key=ex.key,
                    text=f"<answer>{int(ex.answer) + 1}</answer>",
                    eval=True,
                ),
                0.0,
                rollout_pb2.REWARD_STATUS_OK,
            )
        )
        cases.append(
            (
                completion(
                    run_id,
                    tokenizer,
                    env="reasoning_gym:basic_arithmetic",
                    key=ex.key,
                    text=f"it is {ex.answer}",
                ),
                0.0,
                rollout_pb2.REWARD_STATUS_PARSE_ERROR,
            )
        )
    cases.append(
        (
            completion(run_id, tokenizer, env="math", key="m000", text="so \\boxed{0.5}"),
            1.0,
            rollout_pb2.REWARD_STATUS_OK,
        )
    )
    cases.append(
        (
            completion(run_id, tokenizer, env="math", key="m000", text="so \\boxed{0.6}"),
            0.0,
            rollout_pb2.REWARD_STATUS_OK,
        )
    )
    for c, _, _ in cases:
        await bus.publish(bus.subjects.rollout_completion, c, msg_id=f"completion:{c.trajectory_id}")

    got = await collect(bus, len(cases))
    for c, reward, status in cases:
        msg_id, scored = got[c.trajectory_id]
        assert msg_id == f"scored:{c.trajectory_id}"
        assert scored.completion == c, "the completion was not carried through unchanged"
        assert scored.status == status, (scored.completion_text, scored.status_reason)
        assert scored.reward == reward, scored.completion_text
        assert scored.components["correctness"] == reward
        assert scored.completion_text == tokenizer.decode(c.completion_token_ids[:-1])
        assert "<|end|>" not in scored.completion_text
        assert scored.scored_at >= c.finished_at

    def details():
        code, body = _get(f"http://127.0.0.1:{scorer}/healthz")
        assert code == 200
        return json.loads(body)

    await wait_for(lambda: details()["scored_total"] >= len(cases), timeout_s=30)
    details = details()
    assert details["status_counts"]["parse_error"] == 20 and details["scored_per_s"] > 0
    code, metrics = _get(f"http://127.0.0.1:{scorer}/metrics")
    assert code == 200
    assert b'offbeat_scorer_scored_total{env="math",status="ok"} 2.0' in metrics
    assert b"offbeat_scorer_score_seconds_bucket" in metrics and b"offbeat_scorer_queue_seconds" in metrics


async def test_group_reward_sees_the_whole_group(scorer, bus, run_id, tokenizer):
    members = [
        completion(
            run_id, tokenizer, env="echo_number", key="train:7", text=f"say {n}", group="G1", size=3, index=i
        )
        for i, n in enumerate([7, 8, 7])
    ]
    for c in members[:2]:
        await bus.publish(bus.subjects.rollout_completion, c, msg_id=f"completion:{c.trajectory_id}")
    await asyncio.sleep(0.5)  # the first two wait for the third
    await bus.publish(
        bus.subjects.rollout_completion, members[2], msg_id=f"completion:{members[2].trajectory_id}"
    )
    got = await collect(bus, 3)
    assert [got[c.trajectory_id][1].reward for c in members] == [1.0, 0.0, 1.0]
    assert all(got[c.trajectory_id][1].components["group_members_seen"] == 3.0 for c in members)


async def test_redelivered_completion_is_scored_once_and_bad_ones_are_dead_lettered(
    scorer, bus, run_id, tokenizer
):
    dead = []

    async def on_dead(msg):
        dead.append(policy_pb2.DeadLetter.FromString(msg.data))

    sub = await bus.nc.subscribe(bus.subjects.dlq, cb=on_dead)
    c = completion(run_id, tokenizer, env="math", key="m000", text="\\boxed{1/2}")
    # the same trajectory published twice under different completion ids (an inference retry)
    await bus.publish(bus.subjects.rollout_completion, c, msg_id=f"completion:{c.trajectory_id}")
    await bus.publish(bus.subjects.rollout_completion, c, msg_id=f"completion:{c.trajectory_id}:again")
    unknown_env = completion(run_id, tokenizer, env="no_such_env", key="k", text="1")
    unknown_key = completion(run_id, tokenizer, env="math", key="nope", text="1")
    unknown_task = completion(run_id, tokenizer, env="reasoning_gym:no_such_task", key="train:1", text="1")
    for bad in (unknown_env, unknown_key, unknown_task):
        await bus.publish(bus.subjects.rollout_completion, bad, msg_id=f"completion:{bad.trajectory_id}")
    await wait_for(lambda: len(dead) >= 3, timeout_s=60)
    reasons = [letter.reason for letter in dead]
    assert all(letter.consumer == "scorer" and letter.deliveries == 1 for letter in dead), (
        "not rejected at once"
    )
    for name in ("no_such_env", "nope", "no_such_task"):
        assert any(name in r for r in reasons), reasons
    await wait_for(lambda: _drained(bus, "scorer"), timeout_s=60)  # both copies handled
    got = await collect(bus, 1)
    assert list(got) == [c.trajectory_id]
    pending, ack_pending = await bus.consumer_pending("trainer")
    assert pending == 0 and ack_pending == 0, "the duplicate score was published again"
    await sub.unsubscribe()


@pytest.mark.slow
async def test_slow_scoring_keeps_its_ack_deadline_alive(
    bus, scorer_config, envpkg_site, nats_url, run_id, tokenizer
):
    # ack_wait 1.5 s, scoring 5 s: without in_progress() the server would redeliver it 3 times
    proc, port = start_scorer(
        scorer_config, envpkg_site=envpkg_site, nats_url=nats_url, run_id=run_id, sets=["bus.ack_wait_s=1.5"]
    )
    try:
        info = await bus.js.consumer_info(bus.subjects.stream, "scorer")
        assert info.config.ack_wait == 1.5, "the service's ack_wait did not apply to the consumer"
        c = completion(run_id, tokenizer, env="slow_echo", key="train:4", text="4")
        await bus.publish(bus.subjects.rollout_completion, c, msg_id=f"completion:{c.trajectory_id}")
        got = await collect(bus, 1)
        assert got[c.trajectory_id][1].reward == 1.0
        await asyncio.sleep(2.0)  # a redelivery, had there been one, would now be scored again
        _, metrics = _get(f"http://127.0.0.1:{port}/metrics")
        line = [
            m
            for m in metrics.decode().splitlines()
            if m.startswith('offbeat_scorer_scored_total{env="slow_echo"')
        ]
        assert line == ['offbeat_scorer_scored_total{env="slow_echo",status="ok"} 1.0'], line
    finally:
        stop_scorer(proc)


async def test_sandbox_down_is_published_as_sandbox_error(scorer, bus, run_id, tokenizer):
    from offbeat.envs import load

    example = load("code").get("c000_add")
    c = completion(run_id, tokenizer, env="code", key=example.key, text=f"```python\n{example.answer}```")
    await bus.publish(bus.subjects.rollout_completion, c, msg_id=f"completion:{c.trajectory_id}")
    got = await collect(bus, 1)
    scored = got[c.trajectory_id][1]
    assert scored.status == rollout_pb2.REWARD_STATUS_SANDBOX_ERROR, (scored.status, scored.status_reason)
    assert "sandbox" in scored.status_reason and scored.reward == 0.0


@pytest.mark.slow
async def test_replicas_share_the_work_and_score_each_completion_once(
    bus, scorer_config, envpkg_site, nats_url, run_id, tokenizer
):
    # each replica holds at most 16 completions and scores each for 0.2 s, so neither can take all 64
    config = scorer_config.parent / "replicas.toml"
    config.write_text(scorer_config.read_text().replace("delay_s = 5.0", "delay_s = 0.2"))
    sets = ["scorer.max_in_flight=16", "scorer.max_scoring=8"]
    replicas = [
        start_scorer(config, envpkg_site=envpkg_site, nats_url=nats_url, run_id=run_id, sets=sets)
        for _ in range(2)
    ]
    try:
        cs = [
            completion(run_id, tokenizer, env="slow_echo", key=f"train:{i % 20}", text=str(i % 20))
            for i in range(64)
        ]
        for c in cs:
            await bus.publish(bus.subjects.rollout_completion, c, msg_id=f"completion:{c.trajectory_id}")
        got = await collect(bus, len(cs), timeout_s=180)
        assert set(got) == {c.trajectory_id for c in cs}
        assert all(scored.reward == 1.0 for _, scored in got.values())

        def totals():
            return [
                json.loads(_get(f"http://127.0.0.1:{port}/healthz")[1])["scored_total"]
                for _, port in replicas
            ]

        await wait_for(lambda: sum(totals()) >= len(cs), timeout_s=30)  # /healthz refreshes every second
        await asyncio.sleep(1.5)
        totals = totals()
        assert sum(totals) == len(cs), f"scored {totals}: some completion was scored twice"
        assert min(totals) > 0, f"one replica did all the work: {totals}"
    finally:
        for proc, _ in replicas:
            stop_scorer(proc)
