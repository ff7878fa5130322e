"""The inference service on a real nats-server: requests in, completions out, weights, control."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
import torch

from offbeat.testing import wait_for
from offbeat.v1 import policy_pb2, rollout_pb2
from offbeat.weights import FileWeightStore, NatsObjectWeightStore

pytestmark = pytest.mark.integration


def request(
    run_id: str,
    *,
    n: int = 1,
    text: str | None = None,
    chat: list[tuple[str, str]] | None = None,
    tokens: list[int] | None = None,
    temperature: float = 1.0,
    max_tokens: int = 8,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
) -> rollout_pb2.RolloutRequest:
    rid = uuid.uuid4().hex[:8]
    req = rollout_pb2.RolloutRequest(
        run_id=run_id,
        request_id=rid,
        group_id=f"g-{rid}",
        env="test",
        prompt_key=f"k-{rid}",
        n=n,
        sampling=rollout_pb2.SamplingParams(temperature=temperature, max_tokens=max_tokens, stop=list(stop)),
        trajectory_ids=[f"{rid}-{i}" for i in range(n)],
        created_at=time.time(),
    )
    if seed is not None:
        req.sampling.seed = seed
    if text is not None:
        req.text = text
    elif chat is not None:
        req.chat.messages.extend(rollout_pb2.ChatMessage(role=r, content=c) for r, c in chat)
    else:
        req.tokens.token_ids.extend(tokens or [])
    return req


async def publish(bus, *reqs: rollout_pb2.RolloutRequest) -> None:
    from offbeat.bus import Publication

    await bus.publish_many(
        Publication(bus.subjects.rollout_request, r, f"request:{r.request_id}:{r.attempt}") for r in reqs
    )


async def collect(bus, subject: str, message_type) -> list:
    received: list = []

    async def on(msg) -> None:
        received.append(msg)

    await bus.subscribe(subject, message_type, on)
    return received


async def announce(bus, version: int, uri: str, sha256: str, size: int = 0, chunks=None) -> None:
    """As the trainer does; with `chunks` (a store's `ChunkDigests`), their digests too."""
    wv = policy_pb2.WeightVersion(
        run_id=bus.run_id,
        version=version,
        step=version,
        parent=version - 1,
        uri=uri,
        sha256=sha256,
        format="safetensors",
        size_bytes=size,
        published_at=time.time(),
        chunk_bytes=chunks.chunk_bytes if chunks else 0,
        chunk_blake3=chunks.digests if chunks else [],
    )
    await bus.put_head(wv)
    await bus.publish(bus.subjects.policy_weights, wv, msg_id=f"weights:{version}")


def forward_logprobs(model_dir: Path, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0]
    lp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    return lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


async def test_each_sample_is_one_completion_with_the_requests_ids(bus, run_id, start_service, tiny_model):
    service = await start_service()
    completions = await collect(bus, bus.subjects.rollout_completion, rollout_pb2.RolloutCompletion)
    chat = request(run_id, n=3, chat=[("system", "be brief"), ("user", "2+2?")], max_tokens=12, seed=5)
    chat.eval = True
    text = request(run_id, n=2, text="hello there", max_tokens=6)
    tokens = request(run_id, n=1, tokens=[10, 20, 30], temperature=0.0, max_tokens=9)
    await publish(bus, chat, text, tokens)
    await wait_for(lambda: len(completions) == 6, timeout_s=60)

    by_id = {c.trajectory_id: c for c in completions}
    assert sorted(by_id) == sorted([*chat.trajectory_ids, *text.trajectory_ids, *tokens.trajectory_ids])
    rendered = service.engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    for i, tid in enumerate(chat.trajectory_ids):
        c = by_id[tid]
        assert (c.request_id, c.group_id, c.env, c.prompt_key, c.sample_index, c.group_size, c.eval) == (
            chat.request_id,
            chat.group_id,
            "test",
            chat.prompt_key,
            i,
            3,
            True,
        )
        assert list(c.prompt_token_ids) == list(rendered)
        assert len(c.completion_token_ids) == len(c.logprobs) == 12 and c.finish_reason == "length"
        assert [(s.version, s.start, s.end) for s in c.version_spans] == [(0, 0, 12)]
        assert c.requested_at == pytest.approx(chat.created_at) and c.started_at <= c.finished_at
        assert c.replica == service.config.replica
    assert len({tuple(by_id[t].completion_token_ids) for t in chat.trajectory_ids}) == 3, (
        "samples share a seed"
    )
    assert list(by_id[text.trajectory_ids[0]].prompt_token_ids) == service.engine.tokenizer.encode(
        "hello there"
    )
    greedy = by_id[tokens.trajectory_ids[0]]
    ref = forward_logprobs(tiny_model, [10, 20, 30], list(greedy.completion_token_ids))
    assert (ref - torch.tensor(list(greedy.logprobs))).abs().max().item() <= 1e-3

    # a re-issue (same ids, attempt + 1) is generated again, but its completion is deduplicated:
    # the stream grows by the re-issue, then by the next request and its completion only
    info = await bus.js.stream_info(bus.subjects.stream)
    reissue = rollout_pb2.RolloutRequest.FromString(tokens.SerializeToString())
    reissue.attempt = 1
    await publish(bus, reissue)
    again = request(run_id, tokens=[1, 2], max_tokens=2)
    await publish(bus, again)
    await wait_for(lambda: any(c.trajectory_id == again.trajectory_ids[0] for c in completions), timeout_s=30)
    after = await bus.js.stream_info(bus.subjects.stream)
    assert after.state.last_seq - info.state.last_seq == 2 + 1, "a repeated completion was not deduplicated"


async def test_requests_that_cannot_succeed_are_dead_lettered(bus, run_id, start_service):
    await start_service(max_model_len=32)
    letters = await collect(bus, bus.subjects.dlq, policy_pb2.DeadLetter)
    wrong_n = request(run_id, n=2, tokens=[1, 2])
    del wrong_n.trajectory_ids[1:]
    too_long = request(run_id, tokens=list(range(1, 40)))
    no_prompt = request(run_id, tokens=[])
    await publish(bus, wrong_n, too_long, no_prompt)
    await wait_for(lambda: len(letters) == 3, timeout_s=30)
    reasons = " | ".join(sorted(letter.reason for letter in letters))
    assert "n=2 with 1 trajectory ids" in reasons and "does not fit the context length 32" in reasons
    assert "no prompt" in reasons or "0 tokens" in reasons


async def test_a_prompt_the_engine_cannot_take_is_dead_lettered_and_the_engine_lives(
    bus, run_id, start_service
):
    # token ids outside the vocabulary made the embedding lookup raise in the engine thread: the
    # replica died, and so did every replica the request was redelivered to (fuzz suite)
    service = await start_service()
    letters = await collect(bus, bus.subjects.dlq, policy_pb2.DeadLetter)
    completions = await collect(bus, bus.subjects.rollout_completion, rollout_pb2.RolloutCompletion)
    vocab = service.engine.vocab_size
    bad = [
        request(run_id, tokens=[1, vocab]),
        request(run_id, tokens=[-1, 2]),
        request(run_id, tokens=[3, 4]),
    ]
    bad[2].sampling.temperature = float("nan")
    good = request(run_id, tokens=[5, 6], max_tokens=3)
    await publish(bus, *bad, good)
    await wait_for(lambda: len(letters) == 3 and len(completions) == 1, timeout_s=30)
    reasons = " | ".join(sorted(letter.reason for letter in letters))
    assert reasons.count("outside the vocabulary") == 2 and "not finite" in reasons, reasons
    assert service.engine.failure is None and service.failure is None


async def test_a_vanishing_temperature_and_a_failing_chat_template_are_dead_lettered_at_once(
    bus, run_id, start_service
):
    # 1e-40 passed as finite, logits / T overflowed and a NaN log-prob reached the trainer; a
    # template's raise_exception was retried max_deliver times
    from offbeat_inference.engine import MIN_TEMPERATURE

    service = await start_service()
    service.engine.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'user' %}{{ raise_exception('Unknown role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    letters = await collect(bus, bus.subjects.dlq, policy_pb2.DeadLetter)
    completions = await collect(bus, bus.subjects.rollout_completion, rollout_pb2.RolloutCompletion)
    tiny = request(run_id, tokens=[3, 4], temperature=1e-40)
    tool = request(run_id, chat=[("tool", "hi")])
    smallest = request(run_id, tokens=[5, 6], temperature=MIN_TEMPERATURE, max_tokens=3)
    await publish(bus, tiny, tool, smallest)
    await wait_for(lambda: len(letters) == 2 and len(completions) == 1, timeout_s=30)
    reasons = " | ".join(sorted(letter.reason for letter in letters))
    assert f"below {MIN_TEMPERATURE}" in reasons and "TemplateError: Unknown role" in reasons, reasons
    assert all(letter.deliveries == 1 for letter in letters), "a refusal was retried"
    assert all(torch.isfinite(torch.tensor(list(completions[0].logprobs))))
    assert service.engine.failure is None and service.failure is None


@pytest.mark.slow
async def test_weights_published_with_64_requests_in_flight(
    bus, run_id, start_service, tiny_model, tiny_model_v1, tmp_path
):
    service = await start_service(max_batch=64)
    completions = await collect(bus, bus.subjects.rollout_completion, rollout_pb2.RolloutCompletion)
    lives = await collect(bus, bus.subjects.policy_live, policy_pb2.PolicyLive)
    reqs = [request(run_id, tokens=[5 + i, 7, 9], temperature=0.0, max_tokens=400) for i in range(64)]
    await publish(bus, *reqs)
    engine = service.engine
    await wait_for(
        lambda: len(engine._rows) == 64 and min(len(s.tokens) for s in engine._rows) >= 2, timeout_s=60
    )

    stored = await FileWeightStore(tmp_path / "weights").put(
        tiny_model_v1 / "model.safetensors", run_id=run_id, version=1
    )
    await announce(bus, 1, stored.uri, stored.sha256, chunks=stored.chunks)
    await wait_for(lambda: any(x.version == 1 for x in lives), timeout_s=60)
    live = next(x for x in lives if x.version == 1)
    assert live.ok and live.error == "" and live.replica == service.config.replica and live.apply_s > 0
    assert completions == [] or all(len(c.completion_token_ids) == 400 for c in completions)

    await wait_for(lambda: len(completions) == 64, timeout_s=180)
    for c in completions:
        spans = [(s.version, s.start, s.end) for s in c.version_spans]
        assert len(spans) == 2 and spans[0][0] == 0 and spans[1][0] == 1, f"spans {spans}"
        assert spans[0][1] == 0 and spans[0][2] == spans[1][1] >= 2 and spans[1][2] == 400
        assert c.finish_reason == "length"
    switch_by_admission: dict[float, set[int]] = {}
    for c in completions:  # rows admitted in the same step switched at the same token
        switch_by_admission.setdefault(c.started_at, set()).add(c.version_spans[0].end)
    assert all(len(s) == 1 for s in switch_by_admission.values()), (
        f"switch not between steps: {switch_by_admission}"
    )

    # greedy completions asked for now are what the new weights give when loaded fresh
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_v1, dtype=torch.float32).eval()
    later = [request(run_id, tokens=[11 + i, 3], temperature=0.0, max_tokens=24) for i in range(3)]
    await publish(bus, *later)
    ids = {r.trajectory_ids[0]: r for r in later}
    await wait_for(lambda: sum(c.trajectory_id in ids for c in completions) == 3, timeout_s=60)
    for c in completions:
        if c.trajectory_id in ids:
            prompt = list(c.prompt_token_ids)
            expected = fresh.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
            assert list(c.completion_token_ids) == expected[0, len(prompt) :].tolist()
            n = len(c.completion_token_ids)
            assert [(s.version, s.start, s.end) for s in c.version_spans] == [(1, 0, n)]


@pytest.mark.parametrize("checked_by", ["chunk digests", "sha256 alone"])
async def test_corrupted_weights_are_refused_and_the_old_version_keeps_serving(
    bus, run_id, start_service, tiny_model, tiny_model_v1, tmp_path, checked_by
):
    service = await start_service()
    lives = await collect(bus, bus.subjects.policy_live, policy_pb2.PolicyLive)
    completions = await collect(bus, bus.subjects.rollout_completion, rollout_pb2.RolloutCompletion)
    store = FileWeightStore(tmp_path / "weights")
    stored = await store.put(tiny_model_v1 / "model.safetensors", run_id=run_id, version=1)
    path = store.local_path(stored.uri)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside a tensor: still loads, but is not what was announced
    path.write_bytes(bytes(data))
    chunks = stored.chunks if checked_by == "chunk digests" else None  # an older trainer's announcement
    await announce(bus, 1, stored.uri, stored.sha256, chunks=chunks)
    await wait_for(lambda: any(x.version == 1 for x in lives), timeout_s=30)
    live = next(x for x in lives if x.version == 1)
    assert not live.ok and "ChecksumError" in live.error
    last = len(stored.chunks.digests) - 1  # the flipped byte is in the last chunk
    expected = f"chunk {last} has BLAKE3" if chunks is not None else "sha256"
    assert expected in live.error, live.error
    assert service.engine.version == 0

    req = request(run_id, tokens=[4, 5, 6], temperature=0.0, max_tokens=10)
    await publish(bus, req)
    await wait_for(lambda: len(completions) == 1, timeout_s=30)
    c = completions[0]
    assert [(s.version, s.start, s.end) for s in c.version_spans] == [(0, 0, 10)]
    ref = forward_logprobs(tiny_model, [4, 5, 6], list(c.completion_token_ids))
    assert (ref - torch.tensor(list(c.logprobs))).abs().max().item() <= 1e-3


async def test_weights_from_the_nats_object_store_the_head_at_start_up_and_a_rollback(
    bus, run_id, start_service, tiny_model, tiny_model_v1, tmp_path
):
    # version 1 is put in the object store and made head before the replica starts: it must start
    # serving it; version 2 (the base weights again, a rollback-like re-announcement) follows live
    store = NatsObjectWeightStore(bus.js, f"w_{run_id}")
    v1 = await store.put(tiny_model_v1 / "model.safetensors", run_id=run_id, version=1)
    await announce(bus, 1, v1.uri, v1.sha256)
    lives = await collect(bus, bus.subjects.policy_live, policy_pb2.PolicyLive)
    service = await start_service()
    assert service.engine.version == 1
    await wait_for(lambda: any(x.version == 1 and x.ok for x in lives), timeout_s=10)
    weights_dir = service.follower.weights_dir
    assert not any(weights_dir.glob("*.safetensors")), "the fetched copy was not removed after apply"

    completions = await collect(bus, bus.subjects.rollout_completion, rollout_pb2.RolloutCompletion)
    req = request(run_id, tokens=[8, 9], temperature=0.0, max_tokens=12)
    await publish(bus, req)
    await wait_for(lambda: len(completions) == 1, timeout_s=30)
    ref = forward_logprobs(tiny_model_v1, [8, 9], list(completions[0].completion_token_ids))
    assert (ref - torch.tensor(list(completions[0].logprobs))).abs().max().item() <= 1e-3

    # a rollback to 0 re-announces the older version: the replica switches back to the base weights
    from offbeat.weights import sha256_file

    base = tiny_model / "model.safetensors"
    wv = policy_pb2.WeightVersion(
        run_id=run_id,
        version=0,
        step=0,
        parent=-1,
        uri=base.as_uri(),
        sha256=sha256_file(base),
        format="safetensors",
    )
    await bus.put_head(wv)
    await bus.publish(bus.subjects.policy_weights, wv, msg_id="weights:0:rollback:c1")
    await wait_for(lambda: service.engine.version == 0, timeout_s=30)
    # the swap comes before its PolicyLive report is published and reaches this collector
    await wait_for(lambda: any(x.version == 0 and x.ok for x in lives), timeout_s=10)
    again = request(run_id, tokens=[8, 9], temperature=0.0, max_tokens=12)
    await publish(bus, again)
    await wait_for(lambda: len(completions) == 2, timeout_s=30)
    ref = forward_logprobs(tiny_model, [8, 9], list(completions[1].completion_token_ids))
    assert (ref - torch.tensor(list(completions[1].logprobs))).abs().max().item() <= 1e-3
    assert [(s.version, s.start, s.end) for s in completions[1].version_spans] == [(0, 0, 12)]


async def test_a_version_whose_announcement_was_missed_is_applied_from_the_kv_head(
    bus, run_id, start_service, tiny_model_v1, tmp_path
):
    # an announcement published while a replica is disconnected from NATS never reaches it (plain
    # subscription); the head in KV does, at the next poll
    service = await start_service(head_poll_s=0.2)
    lives = await collect(bus, bus.subjects.policy_live, policy_pb2.PolicyLive)
    stored = await FileWeightStore(tmp_path / "weights").put(
        tiny_model_v1 / "model.safetensors", run_id=run_id, version=1
    )
    await bus.put_head(
        policy_pb2.WeightVersion(
            run_id=run_id,
            version=1,
            step=1,
            parent=0,
            uri=stored.uri,
            sha256=stored.sha256,
            format="safetensors",
        )
    )
    await wait_for(lambda: service.engine.version == 1, timeout_s=30)
    await wait_for(lambda: any(x.version == 1 and x.ok for x in lives), timeout_s=10)


async def test_announcements_of_another_run_or_of_none_are_ignored(
    bus, run_id, start_service, tiny_model_v1, tmp_path
):
    service = await start_service(head_poll_s=30.0)
    stored = await FileWeightStore(tmp_path / "weights").put(
        tiny_model_v1 / "model.safetensors", run_id=run_id, version=1
    )
    for i, other in enumerate(("", "another-run")):
        wv = policy_pb2.WeightVersion(
            run_id=other,
            version=1,
            step=1,
            parent=0,
            uri=stored.uri,
            sha256=stored.sha256,
            format="safetensors",
        )
        await bus.publish(bus.subjects.policy_weights, wv, msg_id=f"weights:1:{i}")
    await asyncio.sleep(2.0)
    assert service.engine.version == 0, "applied weights announced for another run"


async def test_pause_holds_new_requests_and_resume_serves_them(bus, run_id, start_service):
    service = await start_service()
    completions = await collect(bus, bus.subjects.rollout_completion, rollout_pb2.RolloutCompletion)
    running = request(run_id, tokens=[3, 4], temperature=0.0, max_tokens=300)
    await publish(bus, running)
    await wait_for(lambda: service.engine.in_flight == 1, timeout_s=30)
    await bus.control(policy_pb2.CONTROL_KIND_PAUSE, command_id="p1")
    await wait_for(lambda: service.paused.is_set(), timeout_s=10)
    held = request(run_id, tokens=[5, 6], max_tokens=4)
    await publish(bus, held)
    # the request in flight finishes while paused
    await wait_for(lambda: len(completions) == 1, timeout_s=60)
    assert completions[0].trajectory_id == running.trajectory_ids[0]
    assert len(completions[0].completion_token_ids) == 300
    # the new one is not taken while paused: give the replica a few fetch rounds to (wrongly) take it
    await asyncio.sleep(1.0)
    pending, ack_pending = await bus.consumer_pending("inference")
    assert pending + ack_pending == 1, "the held request left the queue"
    assert len(completions) == 1 and service.engine.in_flight == 0 and service.requests_in_flight == 0
    await bus.control(policy_pb2.CONTROL_KIND_RESUME, command_id="r1")
    await wait_for(lambda: len(completions) == 2, timeout_s=30)
    assert completions[1].trajectory_id == held.trajectory_ids[0]


async def test_a_control_command_of_another_run_or_of_none_is_ignored(bus, run_id, start_service):
    service = await start_service()
    for i, other in enumerate(("", "another-run")):
        for kind in (policy_pb2.CONTROL_KIND_PAUSE, policy_pb2.CONTROL_KIND_STOP):
            cmd = policy_pb2.ControlCommand(run_id=other, command_id=f"x{i}{kind}", kind=kind)
            await bus.publish(bus.subjects.control("pause"), cmd, msg_id=f"control:x{i}{kind}")
    await asyncio.sleep(1.0)
    assert not service.paused.is_set() and not service.ctx.stop.is_set(), "obeyed another run's command"


async def test_a_replica_started_while_paused_waits_for_resume(bus, run_id, start_service):
    await bus.control(policy_pb2.CONTROL_KIND_PAUSE, command_id="p0")
    service = await start_service()
    assert service.paused.is_set()
    completions = await collect(bus, bus.subjects.rollout_completion, rollout_pb2.RolloutCompletion)
    await publish(bus, request(run_id, tokens=[1, 2, 3], max_tokens=3))
    await asyncio.sleep(1.0)
    assert completions == []
    await bus.control(policy_pb2.CONTROL_KIND_RESUME, command_id="r0")
    await wait_for(lambda: len(completions) == 1, timeout_s=30)


async def test_a_65536_token_completion_goes_through_the_bus(bus, run_id):
    # the longest rollouts (INTELLECT-3) are 65,536 tokens: their completion message, with a
    # log-prob per token and a version switch, must fit the bus's payload limit like any other
    from offbeat_inference.engine import Generation
    from offbeat_inference.service import to_completion

    received = await collect(bus, bus.subjects.rollout_completion, rollout_pb2.RolloutCompletion)
    n = 65_536
    req = request(run_id, tokens=list(range(1, 200)))
    gen = Generation(
        token_ids=[(i * 7919) % 150_000 for i in range(n)],
        logprobs=[-(i % 97) / 10.0 for i in range(n)],
        finish_reason="length",
        spans=[(3, 0, 40_000), (4, 40_000, n)],
        started_at=time.time(),
        finished_at=time.time(),
    )
    completion = to_completion(req, 0, list(range(1, 200)), gen, replica="r")
    size = completion.ByteSize()
    assert size < bus.cfg.max_payload_bytes, f"{size} bytes"
    await bus.publish(
        bus.subjects.rollout_completion, completion, msg_id=f"completion:{req.trajectory_ids[0]}"
    )
    await wait_for(lambda: len(received) == 1, timeout_s=30)
    got = received[0]
    assert list(got.completion_token_ids) == gen.token_ids
    assert list(got.logprobs) == pytest.approx(gen.logprobs, abs=1e-6)
    assert [(s.version, s.start, s.end) for s in got.version_spans] == gen.spans


async def test_a_dead_engine_stops_the_replica_and_its_request_is_not_lost(bus, run_id, start_service):
    service = await start_service()
    layer = service.engine.model.model.layers[0]

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    layer.forward = broken  # the next decode step fails inside the engine's thread
    req = request(run_id, tokens=[1, 2, 3], max_tokens=5)
    await publish(bus, req)
    task = next(t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "InferenceService.run")
    with pytest.raises(RuntimeError, match="simulated device failure"):
        await asyncio.wait_for(task, timeout=60)
    assert not service.ctx.health.healthy
    pending, ack_pending = await bus.consumer_pending("inference")
    assert pending + ack_pending == 1, "the request of the dead replica was acked or dropped"
