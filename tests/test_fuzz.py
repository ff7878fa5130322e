"""Fuzzing a live run: hostile bytes on every bus subject and malformed calls to the admin API.

`offbeat run` runs all five services. hypothesis (derandomized: the same corpus every run)
generates, per subject of the run (`rollout.request`, `rollout.completion`, `rollout.scored`,
`policy.weights`, `policy.live`, `trainer.step`, `control.*`, `dlq`) and for `sandbox.exec`:

- random bytes;
- mutations of a valid message (bit flips, truncation, inserted, deleted and spliced bytes);
- well-formed messages with hostile values (token ids outside the vocabulary, negative counts,
  NaN rewards and log-probs, lengths that disagree, unknown environments and enum values).

Each is published (JetStream, its own msg id) while the run trains. A payload that parses as a
well-formed message of *this run* on a control subject (`policy.*`, `trainer.step`, `control.*`)
is not published: it is a valid command, which the services obey by design (the bus carries no
producer identity). Data subjects get everything, with the fuzz's own trajectory ids.

Then: no service died or was restarted; every payload that does not parse, or names another run,
is a dead letter in the ledger with its reason; the sandbox answered every request; the run goes
on training (three more steps), and once stopped the audit finds nothing lost or trained twice. The admin API gets random
request bodies, bad tokens, unknown methods and invalid arguments: every call ends with a gRPC
status that is not INTERNAL or UNKNOWN and carries a message, and the API still answers.

The smoke variant (few examples) runs by default; the full one under `make chaos`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from harness import ADMIN_TOKEN, LiveRun, audit, query, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offbeat.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, rollout_pb2, sandbox_pb2

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TYPES: dict[str, type[Message]] = {
    "rollout.request": rollout_pb2.RolloutRequest,
    "rollout.completion": rollout_pb2.RolloutCompletion,
    "rollout.scored": rollout_pb2.ScoredTrajectory,
    "policy.weights": policy_pb2.WeightVersion,
    "policy.live": policy_pb2.PolicyLive,
    "trainer.step": policy_pb2.TrainerStep,
    "control": policy_pb2.ControlCommand,
    "dlq": policy_pb2.DeadLetter,
}
CONTROL_PLANE = ("policy.weights", "policy.live", "trainer.step", "control")
"""Subjects whose well-formed messages of this run are commands the services obey."""
CONSUMER_OF = {"rollout.request": "inference", "rollout.completion": "scorer", "rollout.scored": "trainer"}
ENV = "sandbox_echo"
I32 = st.integers(-(2**31), 2**31 - 1)
F32 = st.floats(width=32)
ANY_TEXT = st.text(max_size=80)


# --- the corpus --------------------------------------------------------------------------------


def valid(kind: str, run_id: str, tag: str = "g") -> Message:
    """A well-formed message of `kind` for this run, naming only the fuzz's own ids (`fz-<tag>-i`;
    each example has its own tag: two messages claiming the same trajectory are another story)."""
    completion = rollout_pb2.RolloutCompletion(
        run_id=run_id,
        trajectory_id=f"fz-{tag}-0",
        request_id=f"fz-{tag}",
        group_id=f"fz-{tag}",
        env=ENV,
        prompt_key="train:3",
        sample_index=0,
        group_size=4,
        prompt_token_ids=[40, 41, 42],
        completion_token_ids=[7, 8],
        logprobs=[-1.5, -0.25],
        finish_reason="length",
        version_spans=[rollout_pb2.VersionSpan(version=0, start=0, end=2)],
        finished_at=time.time(),
    )
    if kind == "rollout.request":
        return rollout_pb2.RolloutRequest(
            run_id=run_id,
            request_id=f"fz-{tag}",
            group_id=f"fz-{tag}",
            env=ENV,
            prompt_key="train:3",
            text="Say 3.",
            n=2,
            sampling=rollout_pb2.SamplingParams(temperature=1.0, max_tokens=4),
            trajectory_ids=[f"fz-{tag}-0", f"fz-{tag}-1"],
            created_at=time.time(),
        )
    if kind == "rollout.completion":
        return completion
    if kind == "rollout.scored":
        return rollout_pb2.ScoredTrajectory(
            completion=completion, reward=1.0, status=rollout_pb2.REWARD_STATUS_OK, scored_at=time.time()
        )
    if kind == "policy.weights":
        return policy_pb2.WeightVersion(
            run_id=run_id, version=9999, step=9999, parent=0, uri="file:///nowhere"
        )
    if kind == "policy.live":
        return policy_pb2.PolicyLive(run_id=run_id, version=9999, replica="fz", ok=False, error="fuzz")
    if kind == "trainer.step":
        return policy_pb2.TrainerStep(run_id=run_id, step=99999, consumed_trajectory_ids=[f"fz-{tag}-0"])
    if kind == "control":
        return policy_pb2.ControlCommand(run_id=run_id, command_id="fz", kind=policy_pb2.CONTROL_KIND_PAUSE)
    if kind == "dlq":
        return policy_pb2.DeadLetter(
            subject=f"offbeat.{run_id}.rollout.request",
            payload=valid("rollout.request", run_id, tag).SerializeToString(),
            reason="fuzz",
            consumer="fz",
        )
    raise KeyError(kind)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice"]))
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 8))]
        else:
            out[at : at + draw(st.integers(0, 8))] = draw(st.binary(max_size=16))
    return bytes(out)


def token_ids() -> st.SearchStrategy[list[int]]:
    return st.lists(st.one_of(st.integers(0, 300), I32), max_size=24)


@st.composite
def hostile_completion(draw: st.DrawFn, run_id: str, tag: str) -> rollout_pb2.RolloutCompletion:
    completion_ids = draw(token_ids())
    logprobs = draw(
        st.one_of(
            st.lists(F32, min_size=len(completion_ids), max_size=len(completion_ids)),
            st.lists(F32, max_size=24),
        )
    )
    return rollout_pb2.RolloutCompletion(
        run_id=run_id,
        trajectory_id=f"fz-{tag}-" + draw(st.text(max_size=60)),
        group_id=f"fz-{tag}",
        env=draw(st.sampled_from([ENV, "", "no-such-env"])),
        prompt_key=draw(st.sampled_from(["train:3", "", "train:999", "eval:1"])),
        sample_index=draw(I32),
        group_size=draw(st.integers(-2, 6)),
        prompt_token_ids=draw(token_ids()),
        completion_token_ids=completion_ids,
        logprobs=logprobs,
        finish_reason=draw(ANY_TEXT),
        version_spans=[
            rollout_pb2.VersionSpan(version=v, start=a, end=b)
            for v, a, b in draw(st.lists(st.tuples(st.integers(-3, 40), I32, I32), max_size=3))
        ],
        eval=draw(st.booleans()),
    )


@st.composite
def hostile(draw: st.DrawFn, kind: str, run_id: str, tag: str) -> Message:
    """A well-formed message with values no service would send."""
    if kind == "rollout.request":
        n = draw(st.integers(-2, 6))
        ids = draw(
            st.one_of(
                st.lists(ANY_TEXT.map(lambda t: f"fz-{tag}-{t}"), max_size=6),
                st.just([f"fz-{tag}-{i}" for i in range(max(n, 0))]),
            )
        )
        request = rollout_pb2.RolloutRequest(
            run_id=run_id,
            request_id=f"fz-{tag}",
            group_id=f"fz-{tag}",
            env=draw(st.sampled_from([ENV, "", "no-such-env"])),
            prompt_key=draw(st.sampled_from(["train:3", "", "nope"])),
            n=n,
            trajectory_ids=ids,
            eval=draw(st.booleans()),
            sampling=rollout_pb2.SamplingParams(
                temperature=draw(F32),
                top_p=draw(F32),
                top_k=draw(I32),
                max_tokens=draw(st.one_of(st.integers(-5, 8), I32)),
                stop=draw(st.lists(ANY_TEXT, max_size=3)),
            ),
        )
        prompt = draw(st.sampled_from(["text", "tokens", "chat", "none"]))
        if prompt == "text":
            request.text = draw(st.text(max_size=200))
        elif prompt == "tokens":
            request.tokens.token_ids.extend(draw(token_ids()))
        elif prompt == "chat":
            request.chat.messages.extend(
                rollout_pb2.ChatMessage(role=r, content=c)
                for r, c in draw(st.lists(st.tuples(ANY_TEXT, ANY_TEXT), max_size=3))
            )
        return request
    if kind == "rollout.completion":
        return draw(hostile_completion(run_id, tag))
    if kind == "rollout.scored":
        return rollout_pb2.ScoredTrajectory(
            completion=draw(hostile_completion(run_id, tag)),
            reward=draw(st.floats()),
            status=draw(st.integers(-1, 9)),
            status_reason=draw(ANY_TEXT),
            completion_text=draw(ANY_TEXT),
        )
    if kind == "dlq":
        return policy_pb2.DeadLetter(
            subject=draw(st.sampled_from([f"offbeat.{run_id}.rollout.request", f"offbeat.{run_id}.x", ""])),
            payload=draw(st.binary(max_size=200)),
            reason=draw(ANY_TEXT),
            consumer=draw(ANY_TEXT),
            deliveries=draw(I32),
        )
    # control-plane kinds: another run's (or no run's) message
    message = valid(kind, run_id, tag)
    message.run_id = draw(st.sampled_from(["", "another-run", run_id + "x"]))  # type: ignore[attr-defined]
    return message


def payloads(kind: str, run_id: str) -> st.SearchStrategy[bytes]:
    def of_tag(tag: str) -> st.SearchStrategy[bytes]:
        return st.one_of(
            st.binary(max_size=600),
            mutated(valid(kind, run_id, tag).SerializeToString()),
            hostile(kind, run_id, tag).map(lambda m: m.SerializeToString()),
        )

    # a tag per example, never repeated (drawn values repeat: derandomized, every subject's corpus
    # draws the same ones, and hypothesis replays some); the kind keeps the subjects apart
    prefix = kind.split(".")[-1][:4]  # requ, comp, scor, weig, live, step, cont, dlq
    counter = itertools.count()
    return st.builds(lambda: f"{prefix}{next(counter):05d}").flatmap(of_tag)


def parses_for_run(kind: str, data: bytes, run_id: str) -> bool:
    """Whether a consumer of `kind` would take this payload as a message of this run."""
    try:
        message: Any = TYPES[kind].FromString(data)
    except DecodeError:
        return False
    if kind == "rollout.scored":
        return bool(message.completion.run_id == run_id)
    if kind == "dlq":
        return True
    return bool(message.run_id == run_id)


def corpus(run_id: str, examples: int) -> list[tuple[str, str, bytes]]:
    """(kind, subject suffix, payload) for every subject: hypothesis as the generator."""
    out: list[tuple[str, str, bytes]] = []

    def collector(kind: str) -> Any:
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            data=payloads(kind, run_id), command=st.sampled_from(["pause", "resume", "rollback", "stop", "x"])
        )
        def collect(data: bytes, command: str) -> None:
            out.append((kind, f"control.{command}" if kind == "control" else kind, data))

        return collect

    for kind in TYPES:
        collector(kind)()
    return out


# --- publishing and the sandbox ---------------------------------------------------------------


async def publish_corpus(nats_url: str, run_id: str, items: list[tuple[str, str, bytes]]) -> dict[str, Any]:
    import nats
    import nats.errors

    nc = await nats.connect(nats_url, connect_timeout=5)
    js = nc.jetstream(timeout=10)
    published: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    invalid: Counter[str] = Counter()
    try:
        for i, (kind, suffix, data) in enumerate(items):
            if kind in CONTROL_PLANE and parses_for_run(kind, data, run_id):
                skipped[kind] += 1
                continue
            try:
                await js.publish(f"offbeat.{run_id}.{suffix}", data, headers={"Nats-Msg-Id": f"fuzz:{i}"})
            except nats.errors.Error:  # e.g. over the stream's size limit: refused, never half-stored
                refused[kind] += 1
                continue
            published[kind] += 1
            if not parses_for_run(kind, data, run_id):
                invalid[kind] += 1
    finally:
        await nc.close()
    return {"published": published, "refused": refused, "skipped_commands": skipped, "invalid": invalid}


async def fuzz_sandbox(nats_url: str, items: list[bytes]) -> Counter[str]:
    """Every request is answered with a result that parses; a malformed one says why."""
    import nats

    nc = await nats.connect(nats_url, connect_timeout=5)
    outcomes: Counter[str] = Counter()
    try:
        for data in items:
            reply = await nc.request("offbeat.sandbox.exec", data, timeout=60)
            result = sandbox_pb2.SandboxExecResult.FromString(reply.data)
            if result.status == sandbox_pb2.EXEC_STATUS_SANDBOX_ERROR:
                assert result.error, f"sandbox error without a message for {data[:60]!r}"
            outcomes[sandbox_pb2.ExecStatus.Name(result.status)] += 1
    finally:
        await nc.close()
    return outcomes


# --- the admin API ------------------------------------------------------------------------------

ALLOWED_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # WatchEvents: a stream that never ends by itself
}
READ_METHODS = ("ListPolicies", "GetStatus", "GetStaleness", "ListTrajectories")
MUTATING = {
    "Pause": admin_pb2.PauseRequest,
    "Resume": admin_pb2.ResumeRequest,
    "Rollback": admin_pb2.RollbackRequest,
}


def fuzz_admin(address: str, examples: int) -> Counter[str]:
    channel = grpc.insecure_channel(address)
    auth = [("authorization", f"Bearer {ADMIN_TOKEN}")]
    outcomes: Counter[str] = Counter()

    def call(method: str, body: bytes, metadata: list[tuple[str, str]], *, stream: bool = False) -> None:
        path = f"/offbeat.v1.AdminService/{method}"
        try:
            if stream:
                for _ in channel.unary_stream(path)(body, metadata=metadata, timeout=1.0):
                    pass
            else:
                channel.unary_unary(path)(body, metadata=metadata, timeout=10.0)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        assert code in ALLOWED_CODES, f"{method}({body[:40]!r}) -> {code}: {details}"
        assert code == grpc.StatusCode.OK or details, f"{method}({body[:40]!r}) -> {code} without a message"
        outcomes[f"{method}:{code.name}"] += 1

    common = {"max_examples": examples, "deadline": None, "database": None, "derandomize": True}

    @settings(**common, suppress_health_check=list(HealthCheck))
    @given(method=st.sampled_from([*READ_METHODS, "WatchEvents"]), body=st.binary(max_size=300))
    def read_calls(method: str, body: bytes) -> None:
        call(method, body, auth, stream=method == "WatchEvents")

    @settings(**common, suppress_health_check=list(HealthCheck))
    @given(method=st.sampled_from(sorted(MUTATING)), body=st.binary(min_size=1, max_size=300))
    def malformed_mutating_calls(method: str, body: bytes) -> None:
        try:  # only bodies that do not parse: a parsed Pause would pause the run, as asked
            MUTATING[method].FromString(body)
        except DecodeError:
            call(method, body, auth)

    @settings(**common, suppress_health_check=list(HealthCheck))
    @given(
        version=st.one_of(st.integers(-(2**63), -1), st.integers(10**6, 2**63 - 1)),
        status=st.text(max_size=30),
        size=I32,
        token=st.binary(max_size=40),
    )
    def invalid_arguments(version: int, status: str, size: int, token: bytes) -> None:
        call("Rollback", admin_pb2.RollbackRequest(version=version).SerializeToString(), auth)
        page = admin_pb2.ListTrajectoriesRequest(
            status=status, page_size=size, page_token=token.decode("latin-1")
        ).SerializeToString()
        call("ListTrajectories", page, auth)

    @settings(**common, suppress_health_check=list(HealthCheck))
    @given(
        method=st.sampled_from([*READ_METHODS, *MUTATING, "NoSuchMethod"]),
        header=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
    )
    def bad_tokens(method: str, header: str) -> None:
        call(method, b"", [("authorization", header)])

    read_calls()
    malformed_mutating_calls()
    invalid_arguments()
    bad_tokens()
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    status = stub.GetStatus(admin_pb2.GetStatusRequest(), metadata=auth, timeout=10)
    assert not status.paused, "the fuzzed admin API paused the run"
    channel.close()
    return outcomes


# --- the test -----------------------------------------------------------------------------------


def letters_by_consumer(database_url: str, run_id: str) -> list[tuple[str, int]]:
    """The services' own dead letters (msg id `dlq:<consumer>:<seq>`, not the fuzz's forged ones)."""
    return query(
        database_url,
        "SELECT consumer, count(*) FROM dead_letters WHERE run_id=%s AND key LIKE 'dlq:%%' GROUP BY 1",
        run_id,
    )


def fuzz(tmp_path: Path, nats_url: str, database_url: str, run_id: str, envpkg: Path, examples: int) -> None:
    # never reached: the run goes on until the checks are done, then it is stopped (Ctrl-C)
    config = write_config(tmp_path, run_id, max_steps=100_000)
    started = time.monotonic()
    run = LiveRun(config, run_id=run_id, nats_url=nats_url, database_url=database_url, pythonpath=envpkg)
    try:
        run.wait(lambda: run.step() >= 2, timeout_s=300, what="step 2")
        run.wait(lambda: len(run.pids()) == 5, timeout_s=60, what="five services")
        pids = run.pids()
        items = corpus(run_id, examples)
        sent = asyncio.run(publish_corpus(nats_url, run_id, items))
        sandbox_items = [d for _, _, d in corpus("sandbox", max(5, examples // 4))]
        sandbox = asyncio.run(fuzz_sandbox(nats_url, sandbox_items))
        address = run.run_dir / run_id / "admin.address"  # the orchestrator's <state_dir>/<run>/
        run.wait(address.exists, timeout_s=60, what="admin address")
        admin = fuzz_admin(address.read_text().strip(), examples)
        step = run.step()
        run.wait(lambda: run.step() >= step + 3, timeout_s=300, what="steps after the fuzz")
        invalid = sent["invalid"]
        expected = {c: invalid[k] for k, c in CONSUMER_OF.items()} | {"ledger": sum(invalid.values())}

        def all_dead_lettered() -> bool:  # each consumer has worked through its queue
            counts = dict(letters_by_consumer(database_url, run_id))
            return all(counts.get(c, 0) >= n for c, n in expected.items())

        run.wait(all_dead_lettered, timeout_s=120, what=f"dead letters for every bad payload ({expected})")
        assert run.pids() == pids, f"services died under fuzzing: {pids} -> {run.pids()}; {run.restarts()}"
    finally:
        run.stop()
    wall_s = time.monotonic() - started
    assert not run.restarts(), run.restarts()
    result = audit(run)
    letters = query(
        database_url,
        "SELECT consumer, subject, reason FROM dead_letters WHERE run_id=%s AND key LIKE 'dlq:%%'",
        run_id,
    )
    assert all(reason for _, _, reason in letters), "a dead letter without a reason"
    by_consumer = Counter(dict(letters_by_consumer(database_url, run_id)))
    fuzz_rows = query(
        database_url,
        "SELECT status, requested_at IS NOT NULL, count(*) FROM trajectories WHERE run_id=%s "
        "AND trajectory_id LIKE 'fz%%' GROUP BY 1, 2",
        run_id,
    )
    counts = result.counts() | {
        "payloads": len(items),
        "published": dict(sent["published"]),
        "refused_by_the_stream": dict(sent["refused"]),
        "well_formed_commands_not_sent": dict(sent["skipped_commands"]),
        "malformed_or_other_run": dict(sent["invalid"]),
        "dead_letters": dict(by_consumer),
        "fuzz_trajectories": {f"{st}{'' if req else ' (no request)'}": n for st, req, n in fuzz_rows},
        "sandbox_replies": dict(sandbox),
        "admin_calls": dict(admin),
        "wall_s": round(wall_s, 1),
    }
    print("fuzz counts:", json.dumps(counts, indent=2, default=str))
    assert by_consumer["ledger"] >= sum(invalid.values()), "the ledger did not dead-letter every bad payload"
    for kind, consumer in CONSUMER_OF.items():
        assert by_consumer[consumer] >= invalid[kind], f"{consumer} did not dead-letter every bad {kind}"
    assert result.steps == list(range(1, len(result.steps) + 1)), result.steps
    result.check_balanced()


def test_hostile_bytes_and_calls_are_refused_and_the_run_goes_on_smoke(
    tmp_path, nats_url, database_url, run_id, envpkg
):
    fuzz(tmp_path, nats_url, database_url, run_id, envpkg, examples=25)


@pytest.mark.chaos
def test_hostile_bytes_and_calls_are_refused_and_the_run_goes_on(
    tmp_path, nats_url, database_url, run_id, envpkg
):
    fuzz(tmp_path, nats_url, database_url, run_id, envpkg, examples=200)
