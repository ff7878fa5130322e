"""The vLLM engine on a real tiny model (skipped where `vllm` is not importable).

Run in the separate venv that `services/inference/scripts/vllm_venv.sh` builds:
`.venv-vllm/bin/python -m pytest -q services/inference/tests -m vllm`. One engine start takes
15-60 s here, so the engine tests share one engine, in file order: log-probs and a refused file
first, then the update with 64 requests in flight.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from offbeat_inference.engine import Sampling, WeightLoadError
from offbeat_inference.vllm_engine import VLLMEngine

from offbeat.testing import wait_for
from offbeat.tinymodel import build_tiny_model
from offbeat.v1 import rollout_pb2
from offbeat.weights import ChecksumError, sha256_file

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
VLLM_TINY = {"hidden_size": 128, "layers": 2}  # the CPU attention kernels need head_dim >= 32


@pytest.fixture(scope="module")
def vllm_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vllm_models")
    return (
        build_tiny_model(root / "v0", seed=0, **VLLM_TINY),
        build_tiny_model(root / "v1", seed=1, **VLLM_TINY),
    )


@pytest.fixture(scope="module")
async def engine(vllm_models):
    e = VLLMEngine(str(vllm_models[0]), capacity=64, max_model_len=2048, cpu_kv_cache_gib=1)
    await e.start()
    yield e
    await e.close()


def forward_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    lp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)[len(prompt) - 1 : -1]
    return lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


async def test_vllm_logprobs_match_teacher_forced_forward(engine, vllm_models):
    model = load(vllm_models[0])
    tok = engine.tokenizer
    cases = [
        (tok.encode(text), Sampling(temperature=t, max_tokens=m, seed=i))
        for i, (text, t, m) in enumerate(
            [("hello", 1.0, 30), ("the quick brown fox", 0.7, 17), ("2+2=", 0.0, 25), ("a", 1.2, 40)] * 3
        )
    ]
    gens = await asyncio.gather(*(engine.generate(p, s) for p, s in cases))
    for (prompt, s), gen in zip(cases, gens, strict=True):
        assert len(gen.token_ids) == len(gen.logprobs) > 0
        diff = (
            (forward_logprobs(model, prompt, gen.token_ids, s.temperature) - torch.tensor(gen.logprobs))
            .abs()
            .max()
        )
        assert diff.item() <= 1e-3, f"vLLM log-probs of {s} differ from the forward pass by {diff.item()}"
        assert gen.spans == [(0, 0, len(gen.token_ids))]
    seeded = await engine.generate(cases[0][0], cases[0][1])
    assert seeded.token_ids == gens[0].token_ids, "a seeded vLLM sample is not reproducible"


async def test_vllm_refuses_a_file_that_does_not_fit_or_is_not_the_announced_one(
    engine, vllm_models, tmp_path
):
    other = build_tiny_model(tmp_path / "other", hidden_size=64, layers=2)
    with pytest.raises(WeightLoadError, match="shape mismatch"):
        await engine.update_weights(other / "model.safetensors", 9)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((other / "model.safetensors").read_bytes()[:500])
    with pytest.raises(WeightLoadError, match="not a readable"):
        await engine.update_weights(truncated, 9)
    fits = tmp_path / "fits.safetensors"  # the right shapes, but not the announced file
    shutil.copyfile(vllm_models[1] / "model.safetensors", fits)
    with pytest.raises(ChecksumError, match="does not match the announced"):
        await engine.update_weights(fits, 9, sha256=sha256_file(vllm_models[0] / "model.safetensors"))
    assert engine.version == 0


async def test_vllm_weights_applied_with_64_requests_in_flight(engine, vllm_models):
    tok = engine.tokenizer
    busy = [
        asyncio.create_task(
            engine.generate(tok.encode(f"busy {i}"), Sampling(temperature=0.0, max_tokens=1500))
        )
        for i in range(64)
    ]
    await wait_for(lambda: engine.llm.get_num_unfinished_requests() == 64, timeout_s=120)
    await asyncio.sleep(0.5)  # let every request decode some tokens under version 0
    applied = await engine.update_weights(vllm_models[1] / "model.safetensors", 1)
    assert applied.version == engine.version == 1
    results = await asyncio.gather(*busy)
    assert len(results) == 64
    for gen in results:
        assert gen.finish_reason == "length" and len(gen.token_ids) == 1500
        assert gen.spans[-1][0] == 1 and gen.spans[-1][2] == 1500, f"spans {gen.spans}"
        assert [v for v, _, _ in gen.spans] in ([0, 1], [1]) and gen.spans[0][1] == 0
    assert sum(len(g.spans) == 2 for g in results) >= 1, "no request was in flight across the switch"

    # greedy completions and log-probs asked for now are those of the new weights loaded fresh
    fresh = load(vllm_models[1])
    for text in ("after the switch", "x"):
        prompt = tok.encode(text)
        gen = await engine.generate(prompt, Sampling(temperature=0.0, max_tokens=24))
        expected = fresh.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[
            0, len(prompt) :
        ]
        assert gen.token_ids == expected.tolist()
        assert gen.spans == [(1, 0, len(gen.token_ids))]
        diff = (forward_logprobs(fresh, prompt, gen.token_ids, 0.0) - torch.tensor(gen.logprobs)).abs().max()
        assert diff.item() <= 1e-3


async def test_the_service_runs_on_the_vllm_engine(bus, run_id, start_service, vllm_models, tmp_path):
    service = await start_service(model_path=vllm_models[0], engine="vllm", max_batch=64, max_model_len=2048)
    received: list[rollout_pb2.RolloutCompletion] = []

    async def on(c: rollout_pb2.RolloutCompletion) -> None:
        received.append(c)

    await bus.subscribe(bus.subjects.rollout_completion, rollout_pb2.RolloutCompletion, on)
    req = rollout_pb2.RolloutRequest(
        run_id=run_id,
        request_id="r",
        group_id="g",
        n=2,
        trajectory_ids=["a", "b"],
        sampling=rollout_pb2.SamplingParams(temperature=1.0, max_tokens=6, seed=3),
        created_at=time.time(),
    )
    req.chat.messages.add(role="user", content="hi")
    await bus.publish(bus.subjects.rollout_request, req, msg_id="request:r:0")
    await wait_for(lambda: len(received) == 2, timeout_s=120)
    model = load(vllm_models[0])
    for c in received:
        assert len(c.completion_token_ids) == len(c.logprobs) == 6
        ref = forward_logprobs(model, list(c.prompt_token_ids), list(c.completion_token_ids), 1.0)
        assert (ref - torch.tensor(list(c.logprobs))).abs().max().item() <= 1e-3
        assert [(s.version, s.start, s.end) for s in c.version_spans] == [(0, 0, 6)]
    assert service.details()["engine"] == "VLLMEngine"

    # weights published through the bus while 64 requests are in flight on the vLLM engine
    from offbeat.v1 import policy_pb2
    from offbeat.weights import FileWeightStore

    lives: list[policy_pb2.PolicyLive] = []

    async def on_live(x: policy_pb2.PolicyLive) -> None:
        lives.append(x)

    await bus.subscribe(bus.subjects.policy_live, policy_pb2.PolicyLive, on_live)
    received.clear()
    for i in range(64):
        r = rollout_pb2.RolloutRequest(
            run_id=run_id,
            request_id=f"b{i}",
            group_id=f"b{i}",
            n=1,
            trajectory_ids=[f"b{i}"],
            sampling=rollout_pb2.SamplingParams(temperature=0.0, max_tokens=1500),
            created_at=time.time(),
        )
        r.tokens.token_ids.extend([5 + i, 7, 9])
        await bus.publish(bus.subjects.rollout_request, r, msg_id=f"request:b{i}:0")
    await wait_for(lambda: service.engine.in_flight == 64, timeout_s=120)
    stored = await FileWeightStore(tmp_path / "weights").put(
        vllm_models[1] / "model.safetensors", run_id=run_id, version=1
    )
    wv = policy_pb2.WeightVersion(
        run_id=run_id, version=1, step=1, parent=0, uri=stored.uri, sha256=stored.sha256, format="safetensors"
    )
    await bus.put_head(wv)
    await bus.publish(bus.subjects.policy_weights, wv, msg_id="weights:1")
    await wait_for(lambda: any(x.version == 1 and x.ok for x in lives), timeout_s=120)
    await wait_for(lambda: len(received) == 64, timeout_s=300)
    for c in received:
        spans = [(s.version, s.start, s.end) for s in c.version_spans]
        assert len(c.completion_token_ids) == 1500 and spans[-1][0] == 1 and spans[-1][2] == 1500, spans
    assert sum(len(c.version_spans) == 2 for c in received) >= 1, "no request was in flight across the switch"
