"""Scorer throughput: the scorer service through the bus against scoring in-process, same run.

For each environment (`reasoning_gym:basic_arithmetic`, and `code` through a real sandbox service):
- direct: in this process, for every completion, what any scorer has to do: find the example by
  its key (`env.get`), detokenize the completion with the run's tokenizer, `await env.score(...)`
  (code: with the same concurrency as the service, since it waits on the sandbox). Also reported:
  `*_score_only_per_s`, the `score` call alone on pre-decoded text, for transparency.
- service: the completions are queued on `rollout.completion` first, then the real `offbeat-scorer`
  (a separate process) scores them and publishes `rollout.scored`; the rate is taken from the
  `scored_at` stamps of the published trajectories (first to last), so neither start-up nor the
  bench's own collection counts.
- bus (reasoning_gym, to split the service's CPU): the same completions carried through the bus
  as the service carries them, but not scored (`bus_cpu`), in this process;
  `reasoning_gym_bus_cpu_us_per_completion` with one message per completion each way, as deployed,
  and `reasoning_gym_bus_grouped_cpu_us_per_completion` with one message per group of 8 each way,
  what per-group messages would cost. The service's CPU minus the first is about its own work.
- the whole scorer, in this process (reasoning_gym, `scorer_cpu`): the bus pass with the service's
  own `Scorer` doing the scoring in between, so everything the service does per completion.
  `reasoning_gym_inprocess_cpu_us_per_completion` with one message per completion each way (to
  check the pass against the service process's CPU) and
  `reasoning_gym_grouped_cpu_us_per_completion` with one message per group each way (a message
  type of one repeated RolloutCompletion field, made here). `reasoning_gym_grouped_ratio_ceiling`
  = direct CPU / that: the ratio a per-group contract would reach at best with the scorer's own
  work as it is (bus and scoring on one core, nothing else in the process).

Completions come in groups of 8 per prompt, a third each correct, wrong and malformed. Direct and
service rounds alternate (3 each by default) and the medians are reported, with the CPU time each
path spends per completion (the scorer process's own CPU for the service), which load from other
processes on the machine disturbs less than wall-clock rates.
Last line: one JSON object with `<env>_service_scored_per_s`, `<env>_direct_scored_per_s`,
`<env>_ratio` (goal for reasoning_gym: ratio >= 0.8), `<env>_*_cpu_us_per_completion`, counts,
statuses, the score-only figure, the bus figures and the in-process scorer figures.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import nats
import nats.errors
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from offbeat_scorer.config import ScorerConfig
from offbeat_scorer.scoring import Scorer
from offbeat_scorer.service import Settled

from offbeat.bus import BatchPublisher, Bus, Outcome, Publication, Received
from offbeat.config import BusConfig, EnvSpec
from offbeat.envs import EnvContext, Environment
from offbeat.envs import load as load_env
from offbeat.infra import NatsServer, free_port
from offbeat.tinymodel import build_tokenizer
from offbeat.v1 import rollout_pb2

BIN = Path(sys.executable).parent
RG_N = int(os.environ.get("BENCH_SCORER_RG_N", "20000"))
CODE_N = int(os.environ.get("BENCH_SCORER_CODE_N", "400"))
GROUP = 8
CODE_CONCURRENCY = 32
ROUNDS = int(os.environ.get("BENCH_SCORER_ROUNDS", "3"))


def rg_texts(env: Environment, n: int, rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for g in range(n // GROUP):
        ex = env.get(f"train:{g}")
        for i in range(GROUP):
            kind = i % 3
            if kind == 0:
                text = f"<think>compute step by step</think>\n<answer>{ex.answer}</answer>"
            elif kind == 1:
                text = f"<think>guess</think>\n<answer>{int(str(ex.answer)) + rng.randint(1, 9)}</answer>"
            else:
                text = f"I think it is {ex.answer}"
            out.append((ex.key, text))
    return out


def code_texts(env: Environment, n: int, rng: random.Random) -> list[tuple[str, str]]:
    examples = list(env.examples("train"))
    out = []
    for g in range(n // GROUP):
        ex = examples[g % len(examples)]
        fn = ex.metadata["function"]
        for i in range(GROUP):
            kind = i % 3
            if kind == 0:
                text = f"```python\n{ex.answer}```"
            elif kind == 1:
                text = f"```python\ndef {fn}(*args):\n    return None\n```"
            else:
                text = f"def {fn}(*args): pass"
            out.append((ex.key, text))
    return out


async def direct_rate(
    env: Environment, items: list[tuple[str, list[int]]], decode: Any, concurrency: int
) -> tuple[float, float]:
    """(scored per second, CPU microseconds per completion) calling `score` in this process."""
    sem = asyncio.Semaphore(concurrency)

    async def one(key: str, ids: list[int]) -> None:
        async with sem:
            await env.score(env.get(key), decode(ids))

    started, cpu = time.perf_counter(), time.process_time()
    if concurrency == 1:
        for key, ids in items:
            await env.score(env.get(key), decode(ids))
    else:
        await asyncio.gather(*(one(k, ids) for k, ids in items))
    return len(items) / (time.perf_counter() - started), (time.process_time() - cpu) / len(items) * 1e6


async def score_only_rate(env: Environment, texts: list[tuple[str, str]]) -> float:
    pairs = [(env.get(k), t) for k, t in texts]
    started = time.perf_counter()
    for example, text in pairs:
        await env.score(example, text)
    return len(pairs) / (time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_service(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{cmd[0]} did not become healthy")
        time.sleep(0.1)


def stop_service(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def completion_messages(
    run_id: str, env_name: str, items: list[tuple[str, list[int]]]
) -> list[rollout_pb2.RolloutCompletion]:
    """What inference publishes for `items`: groups of `GROUP` samples of one prompt each."""
    return [
        rollout_pb2.RolloutCompletion(
            run_id=run_id,
            trajectory_id=f"t{i}",
            request_id=f"r{i // GROUP}",
            group_id=f"g{i // GROUP}",
            env=env_name,
            prompt_key=key,
            sample_index=i % GROUP,
            group_size=GROUP,
            prompt_token_ids=list(range(40)),
            completion_token_ids=ids,
            logprobs=[-0.5] * len(ids),
            finish_reason="stop",
            finished_at=time.time(),
        )
        for i, (key, ids) in enumerate(items)
    ]


async def service_rate(
    *,
    url: str,
    tmp: Path,
    tokenizer_dir: Path,
    env_name: str,
    items: list[tuple[str, list[int]]],
    max_scoring: int,
    sandbox_prefix: str = "offbeat",
) -> tuple[float, float, dict[str, int]]:
    """(scored per second, scorer CPU microseconds per completion, statuses) through the service."""
    run_id = f"b{uuid.uuid4().hex[:8]}"
    cfg = BusConfig(nats_url=url, stream_max_bytes=1024**3)
    bus = await Bus.connect(cfg, run_id, name="bench")
    await bus.ensure()
    completions = completion_messages(run_id, env_name, items)

    for start in range(0, len(completions), 2000):
        await bus.publish_many(
            Publication(bus.subjects.rollout_completion, c, f"completion:{c.trajectory_id}")
            for c in completions[start : start + 2000]
        )
    config = tmp / f"{run_id}.toml"
    config.write_text(
        f'[run]\nid = "{run_id}"\nstate_dir = "{tmp / "state"}"\n[bus]\nstream_max_bytes = {1024**3}\n'
        f'[model]\npath = "{tokenizer_dir}"\n[[envs]]\nname = "{env_name}"\n'
        f'[scorer]\nmax_scoring = {max_scoring}\nsandbox_subject = "{sandbox_prefix}.sandbox.exec"\n'
        'log_level = "WARNING"\n'
    )
    port = free_port()
    proc = start_service(
        [
            str(BIN / "offbeat-scorer"),
            "--config",
            str(config),
            "--nats-url",
            url,
            "--set",
            f"scorer.health_port={port}",
        ],
        port,
    )
    cpu = cpu_seconds(proc.pid)  # healthy: imports and set-up are done, consuming starts now
    try:
        while (await bus.consumer_pending("scorer")) != (0, 0):  # noqa: ASYNC110 (polls the server)
            await asyncio.sleep(0.2)
        cpu = cpu_seconds(proc.pid) - cpu
    finally:
        stop_service(proc)
    sub = await bus._pull("trainer")
    stamps: list[float] = []
    statuses: dict[str, int] = {}
    while len(stamps) < len(items):
        try:
            msgs = await sub.fetch(1000, timeout=2.0)
        except (TimeoutError, nats.errors.TimeoutError):
            break
        for msg in msgs:
            scored = rollout_pb2.ScoredTrajectory.FromString(msg.data)
            stamps.append(scored.scored_at)
            name = rollout_pb2.RewardStatus.Name(scored.status).removeprefix("REWARD_STATUS_").lower()
            statuses[name] = statuses.get(name, 0) + 1
            await msg.ack()
    await bus.delete_streams()
    await bus.close()
    if len(stamps) != len(items):
        raise SystemExit(f"{env_name}: {len(stamps)} scored of {len(items)}")
    stamps.sort()
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), cpu / len(stamps) * 1e6, statuses


async def bus_cpu(url: str, items: list[tuple[str, list[int]]], texts: list[str], group: int) -> float:
    """CPU microseconds per completion that carrying the completions through the bus costs, the
    way the service carries them but with no scoring at all, in this process: pull from
    `rollout.completion` (`Bus.consume_batches`, the service's `max_in_flight`), publish a scored
    message through a `BatchPublisher` and ack the completion once the server stored it.

    `group` = 1 is the service's traffic (one message per completion each way). With `group` =
    `GROUP`, one message carries a whole group each way (its members' payloads back to back, the
    bytes a repeated field would carry): what per-group messages would cost instead."""
    run_id = f"x{uuid.uuid4().hex[:8]}"
    bus = await Bus.connect(BusConfig(nats_url=url, stream_max_bytes=1024**3), run_id, name="bench-bus")
    await bus.ensure()
    completions = completion_messages(run_id, "env", items)
    scored = [
        rollout_pb2.ScoredTrajectory(
            completion=c,
            reward=1.0,
            components={"correctness": 1.0, "format": 1.0},
            status=rollout_pb2.REWARD_STATUS_OK,
            scored_at=time.time(),
            completion_text=text,
        ).SerializeToString()
        for c, text in zip(completions, texts, strict=True)
    ]
    wire = [c.SerializeToString() for c in completions]
    ins = [b"".join(wire[i : i + group]) for i in range(0, len(wire), group)]
    outs = [b"".join(scored[i : i + group]) for i in range(0, len(scored), group)]
    subject = bus.subjects.rollout_completion
    for start in range(0, len(ins), 2000):
        await bus.publish_many(
            Publication(subject, None, f"c:{i}", ins[i]) for i in range(start, min(len(ins), start + 2000))
        )
    publisher = BatchPublisher(bus, max_batch=ScorerConfig().publish_batch)
    publishing = asyncio.create_task(publisher.run())
    stop = asyncio.Event()
    sent = itertools.count()

    async def handle(batch: list[Received[bytes]]) -> list[Outcome]:
        settled = Settled([None] * len(batch))  # the service's: acks wait for the stored scores
        for index in range(len(batch)):
            n = next(sent)
            settled.publishing += 1
            publisher.add(
                Publication(bus.subjects.rollout_scored, None, f"s:{n}", outs[n]),
                functools.partial(settled.published, index),
            )
            if n + 1 == len(ins):
                stop.set()
        return await settled.wait()

    cpu = time.process_time()
    await bus.consume_batches("scorer", None, handle, stop=stop, max_in_flight=ScorerConfig().max_in_flight)
    cpu = time.process_time() - cpu
    publisher.close()
    await publishing
    await bus.delete_streams()
    await bus.close()
    return cpu / len(items) * 1e6


def completion_group_type() -> Any:
    """A message of one repeated field, `completions = 1` of RolloutCompletion: what a per-group
    contract would carry on `rollout.completion` (made here: the contract has no such message)."""
    name = "offbeat/bench/completion_group.proto"
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(name)
    except KeyError:
        fdp = descriptor_pb2.FileDescriptorProto(
            name=name, package="offbeat.bench", dependency=[rollout_pb2.DESCRIPTOR.name]
        )
        group = fdp.message_type.add(name="CompletionGroup")
        group.field.add(
            name="completions",
            number=1,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
            type_name=".offbeat.v1.RolloutCompletion",
        )
        pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("offbeat.bench.CompletionGroup"))


def field1_entries(payloads: list[bytes]) -> bytes:
    """The payloads as the entries of a repeated field 1 (what a repeated message field carries)."""
    out = bytearray()
    for p in payloads:
        out.append(1 << 3 | 2)  # field 1, length-delimited
        n = len(p)
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        out.append(n)
        out += p
    return bytes(out)


def split_field1(data: bytes) -> list[bytes]:
    """The entries of `field1_entries`, as the bytes they were."""
    out, pos = [], 0
    while pos < len(data):
        pos += 1  # the tag
        n = shift = 0
        while True:
            b = data[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        out.append(data[pos : pos + n])
        pos += n
    return out


async def scorer_cpu(
    url: str, items: list[tuple[str, list[int]]], tokenizer_dir: Path, env_name: str, group: int
) -> float:
    """CPU microseconds per completion of everything the scorer service does, in this process and
    with the service's own `Scorer`, when one message carries `group` completions each way: pull
    from `rollout.completion`, parse, `Scorer.score_batch` (look up, decode, score, build each
    ScoredTrajectory), publish one message per group through a `BatchPublisher`, ack once stored.

    With `group` = `GROUP` it is the whole cost of a scorer under a per-group contract (the
    completions of a group in one message, their scored trajectories in one message back), the
    floor that redesign would reach with the scorer's work as it is; `group` = 1 checks this pass
    against the service process's own CPU."""
    run_id = f"s{uuid.uuid4().hex[:8]}"
    bus = await Bus.connect(BusConfig(nats_url=url, stream_max_bytes=1024**3), run_id, name="bench-grouped")
    await bus.ensure()
    wire = [c.SerializeToString() for c in completion_messages(run_id, env_name, items)]
    ins = [field1_entries(wire[i : i + group]) for i in range(0, len(wire), group)]
    for start in range(0, len(ins), 2000):
        await bus.publish_many(
            Publication(bus.subjects.rollout_completion, None, f"c:{i}", ins[i])
            for i in range(start, min(len(ins), start + 2000))
        )
    config = ScorerConfig()
    scorer = Scorer.with_tokenizer(config, [EnvSpec(name=env_name)], str(tokenizer_dir))
    await scorer.setup(EnvContext())
    group_type = completion_group_type()
    publisher = BatchPublisher(bus, max_batch=config.publish_batch)
    publishing = asyncio.create_task(publisher.run())
    stop = asyncio.Event()
    handled = 0

    async def handle(batch: list[Received[bytes]]) -> list[Outcome]:
        nonlocal handled
        outcomes: list[Outcome] = [None] * len(batch)
        members, payloads, owner, sizes = [], [], [], []
        for index, received in enumerate(batch):
            got = group_type.FromString(received.message).completions
            members.extend(got)
            payloads.extend(split_field1(received.message))
            owner.extend([index] * len(got))
            sizes.append(len(got))
        scored: list[list[bytes]] = [[] for _ in batch]
        settled = Settled(outcomes)

        def emit(i: int, data: bytes) -> None:
            index = owner[i]
            scored[index].append(data)
            if len(scored[index]) == sizes[index]:
                msg_id = f"scored:{members[i].group_id}"
                settled.publishing += 1
                publisher.add(
                    Publication(bus.subjects.rollout_scored, None, msg_id, field1_entries(scored[index])),
                    functools.partial(settled.published, index),
                )

        for outcome in await scorer.score_batch(members, emit, payloads=payloads):
            if outcome is not None:
                raise outcome
        await settled.wait()
        handled += len(batch)
        if handled >= len(ins):
            stop.set()
        return outcomes

    cpu = time.process_time()
    await bus.consume_batches("scorer", None, handle, stop=stop, max_in_flight=config.max_in_flight)
    cpu = time.process_time() - cpu
    publisher.close()
    await publishing
    await scorer.close()
    await bus.delete_streams()
    await bus.close()
    return cpu / len(items) * 1e6


def summary(
    name: str,
    direct: list[tuple[float, float]],
    service: list[tuple[float, float]],
    n: int,
    statuses: dict[str, int],
) -> dict[str, Any]:
    """Median of the alternated rounds: rates and the CPU each path spends per completion."""
    d_rate = statistics.median(r for r, _ in direct)
    s_rate = statistics.median(r for r, _ in service)
    return {
        f"{name}_n": n,
        f"{name}_rounds": len(direct),
        f"{name}_direct_scored_per_s": round(d_rate, 1),
        f"{name}_service_scored_per_s": round(s_rate, 1),
        f"{name}_ratio": round(s_rate / d_rate, 3),
        f"{name}_direct_cpu_us_per_completion": round(statistics.median(c for _, c in direct), 1),
        f"{name}_service_cpu_us_per_completion": round(statistics.median(c for _, c in service), 1),
        f"{name}_statuses": statuses,
    }


async def main() -> None:
    from transformers import AutoTokenizer

    rng = random.Random(0)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server = NatsServer.start(tmp, max_file_store_bytes=8 * 1024**3)
        tokenizer_dir = tmp / "tok"
        build_tokenizer(tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))

        def encode(text: str) -> list[int]:
            return [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]

        # the service's own decode (the fast tokenizer's backend; equal to tokenizer.decode here)
        decode = Scorer.with_tokenizer(ScorerConfig(), [], str(tokenizer_dir)).decode
        probe = encode("<answer>12</answer> done")
        assert decode(probe) == tokenizer.decode(probe, skip_special_tokens=True)

        try:
            # reasoning-gym: CPU-bound rubric, scored one after another in-process
            rg_name = "reasoning_gym:basic_arithmetic"
            rg = load_env(rg_name)
            texts = rg_texts(rg, RG_N, rng)
            items = [(k, encode(t)) for k, t in texts]
            # as the service does once set up: what exists now lives as long as the process, and
            # the cyclic GC would walk it again on every full collection, in every pass alike
            gc.collect()
            gc.freeze()
            figures["reasoning_gym_score_only_per_s"] = round(
                await score_only_rate(load_env(rg_name), texts), 1
            )
            direct, service, bus_single, bus_grouped, whole_single, whole_grouped = [], [], [], [], [], []
            for _ in range(ROUNDS):  # alternated, so load from elsewhere hits both alike
                direct.append(await direct_rate(load_env(rg_name), items, decode, 1))
                bus_single.append(await bus_cpu(server.url, items, [t for _, t in texts], 1))
                bus_grouped.append(await bus_cpu(server.url, items, [t for _, t in texts], GROUP))
                whole_single.append(await scorer_cpu(server.url, items, tokenizer_dir, rg_name, 1))
                whole_grouped.append(await scorer_cpu(server.url, items, tokenizer_dir, rg_name, GROUP))
                rate, cpu, statuses = await service_rate(
                    url=server.url,
                    tmp=tmp,
                    tokenizer_dir=tokenizer_dir,
                    env_name=rg_name,
                    items=items,
                    max_scoring=64,
                )
                service.append((rate, cpu))
            figures.update(summary("reasoning_gym", direct, service, len(items), statuses))
            figures["reasoning_gym_bus_cpu_us_per_completion"] = round(statistics.median(bus_single), 1)
            figures["reasoning_gym_bus_grouped_cpu_us_per_completion"] = round(
                statistics.median(bus_grouped), 1
            )
            figures["reasoning_gym_inprocess_cpu_us_per_completion"] = round(
                statistics.median(whole_single), 1
            )
            grouped_cpu = statistics.median(whole_grouped)
            figures["reasoning_gym_grouped_cpu_us_per_completion"] = round(grouped_cpu, 1)
            figures["reasoning_gym_grouped_ratio_ceiling"] = round(
                statistics.median(c for _, c in direct) / grouped_cpu, 3
            )
            print(json.dumps(figures), flush=True)

            # code: every score is a sandbox round trip; direct uses the service's concurrency
            sandbox_port = free_port()
            sbx_config = tmp / "sandbox.toml"
            sbx_config.write_text(f'[run]\nstate_dir = "{tmp / "sbx"}"\n')
            sandbox = start_service(
                [
                    str(BIN / "offbeat-sandbox"),
                    "--config",
                    str(sbx_config),
                    "--nats-url",
                    server.url,
                    "--set",
                    "bus.prefix=benchsbx",
                    "--set",
                    f"sandbox.health_port={sandbox_port}",
                    "--set",
                    'sandbox.log_level="WARNING"',
                ],
                sandbox_port,
            )
            try:
                nc = await nats.connect(server.url)
                code = load_env("code")
                await code.setup(EnvContext(nats=nc, sandbox_subject="benchsbx.sandbox.exec"))
                ctexts = code_texts(code, CODE_N, rng)
                citems = [(k, encode(t)) for k, t in ctexts]
                direct, service = [], []
                for _ in range(ROUNDS):
                    direct.append(await direct_rate(code, citems, decode, CODE_CONCURRENCY))
                    rate, cpu, cstatuses = await service_rate(
                        url=server.url,
                        tmp=tmp,
                        tokenizer_dir=tokenizer_dir,
                        env_name="code",
                        items=citems,
                        max_scoring=CODE_CONCURRENCY,
                        sandbox_prefix="benchsbx",
                    )
                    service.append((rate, cpu))
                await nc.close()
            finally:
                stop_service(sandbox)
            figures.update(summary("code", direct, service, len(citems), cstatuses))
            figures["code_concurrency"] = CODE_CONCURRENCY
        finally:
            server.stop()
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
