"""The transformers engine on a real tiny model: log-probs, sampling, continuous batching, weights."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from offbeat_inference import weightfile
from offbeat_inference.engine import MIN_TEMPERATURE, Sampling, WeightLoadError
from offbeat_inference.hf_engine import HFEngine
from offbeat_inference.sampling import RowSampling, sample
from offbeat_inference.weightfile import read_safetensors

from offbeat.testing import wait_for
from offbeat.weights import ChecksumError, chunk_digests, sha256_file


async def started(path: Path, **kwargs: object) -> HFEngine:
    engine = HFEngine(str(path), **kwargs)  # type: ignore[arg-type]
    await engine.start()
    return engine


def teacher_forced_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    scale = temperature if temperature > 0 else 1.0
    lp = torch.log_softmax(logits / scale, dim=-1)[len(prompt) - 1 : -1]
    return lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.slow
async def test_logprobs_match_teacher_forced_forward_under_continuous_batching(tiny_model):
    # capacity 3 < 12 sequences of different prompt and completion lengths: rows are admitted and
    # retired between steps, the cache is merged, padded and trimmed, and still every log-prob
    # equals the forward pass of the whole sequence.
    engine = await started(tiny_model, capacity=3)
    try:
        tok = engine.tokenizer
        texts = ["hi", "the quick brown fox", "a", "2+2=", "once upon a time there was", "xyz"] * 2
        settings = [
            Sampling(temperature=1.0, max_tokens=9, seed=1),
            Sampling(temperature=0.7, max_tokens=23, seed=2),
            Sampling(temperature=0.0, max_tokens=14),
            Sampling(temperature=1.3, top_p=0.8, max_tokens=31, seed=4),
            Sampling(temperature=1.0, top_k=5, max_tokens=5, seed=5),
            Sampling(temperature=0.9, top_p=0.5, top_k=20, max_tokens=17, seed=6),
        ] * 2
        prompts = [tok.encode(t) for t in texts]
        gens = await asyncio.gather(*(engine.generate(p, s) for p, s in zip(prompts, settings, strict=True)))
        for prompt, s, gen in zip(prompts, settings, gens, strict=True):
            assert len(gen.token_ids) == len(gen.logprobs) > 0
            ref = teacher_forced_logprobs(engine.model, prompt, gen.token_ids, s.temperature)
            diff = (ref - torch.tensor(gen.logprobs)).abs().max().item()
            assert diff <= 1e-3, f"log-probs of {s} differ from the forward pass by {diff}"
            assert gen.spans == [(0, 0, len(gen.token_ids))]
    finally:
        await engine.close()


async def test_greedy_and_seeded_samples_do_not_depend_on_the_batch(tiny_model):
    engine = await started(tiny_model, capacity=8)
    try:
        prompt = engine.tokenizer.encode("same prompt")
        alone = await engine.generate(prompt, Sampling(temperature=1.0, max_tokens=12, seed=42))
        greedy_alone = await engine.generate(prompt, Sampling(temperature=0.0, max_tokens=12))
        crowd = [
            engine.generate(engine.tokenizer.encode(f"other {i}"), Sampling(max_tokens=7, seed=i))
            for i in range(6)
        ]
        batched, greedy_batched, *_ = await asyncio.gather(
            engine.generate(prompt, Sampling(temperature=1.0, max_tokens=12, seed=42)),
            engine.generate(prompt, Sampling(temperature=0.0, max_tokens=12)),
            *crowd,
        )
        assert batched.token_ids == alone.token_ids, "a seeded sample changed with its batch mates"
        assert greedy_batched.token_ids == greedy_alone.token_ids
        other_seed = await engine.generate(prompt, Sampling(temperature=1.0, max_tokens=12, seed=43))
        assert other_seed.token_ids != alone.token_ids, "the seed does not reach the sampler"
    finally:
        await engine.close()


async def test_finish_reasons_stop_string_eos_and_length(tiny_model):
    engine = await started(tiny_model, capacity=4, max_model_len=64)
    try:
        prompt = engine.tokenizer.encode("abc")
        free = await engine.generate(prompt, Sampling(temperature=0.0, max_tokens=20))
        assert free.finish_reason == "length" and len(free.token_ids) == 20
        # a stop string taken from the greedy continuation itself ends generation right after it
        text = engine.tokenizer.decode(free.token_ids[3:5])
        stopped = await engine.generate(prompt, Sampling(temperature=0.0, max_tokens=20, stop=(text,)))
        assert stopped.finish_reason == "stop"
        assert engine.tokenizer.decode(stopped.token_ids).endswith(text)
        assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
        # the context length bounds a completion
        long = await engine.generate(prompt, Sampling(temperature=0.0, max_tokens=1000))
        assert long.finish_reason == "length" and len(prompt) + len(long.token_ids) == 64
        with pytest.raises(ValueError, match="no room"):
            await engine.generate(list(range(5, 69)), Sampling(max_tokens=1))
    finally:
        await engine.close()


async def test_eos_token_finishes_with_stop(tiny_model, tmp_path):
    # The model's generation config may name several end tokens; make the greedy continuation's
    # first token that does not repeat an earlier one an end token: generation must stop there.
    engine = await started(tiny_model, capacity=2)
    prompt = engine.tokenizer.encode("hello")
    sampling = Sampling(temperature=1.0, max_tokens=20, seed=11)
    free = await engine.generate(prompt, sampling)
    await engine.close()
    cut = next(i for i in range(1, 20) if free.token_ids[i] not in free.token_ids[:i])
    end = free.token_ids[cut]
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], end]
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    engine = await started(model_dir, capacity=2)
    try:
        gen = await engine.generate(prompt, sampling)
        assert gen.token_ids == free.token_ids[: cut + 1] and gen.finish_reason == "stop"
    finally:
        await engine.close()


async def test_finished_sequences_free_their_slot_between_steps(tiny_model):
    # One long and twelve short sequences through 4 slots. With continuous batching the short ones
    # stream through the 3 free slots while the long one decodes, so the whole run takes as many
    # steps as the long one has tokens (static batches of 4 need 200 + 3 * 5 = 215 steps: checked below).
    engine = await started(tiny_model, capacity=4)
    try:
        tok = engine.tokenizer
        long = engine.generate(tok.encode("long"), Sampling(temperature=0.0, max_tokens=200))
        shorts = [
            engine.generate(tok.encode(f"s{i}"), Sampling(temperature=0.0, max_tokens=5)) for i in range(12)
        ]
        results = await asyncio.gather(long, *shorts)
        assert [len(g.token_ids) for g in results] == [200] + [5] * 12
        assert engine.steps <= 201, f"{engine.steps} steps: finished rows did not free their slots"
        assert max(g.finished_at for g in results[1:]) <= results[0].finished_at
    finally:
        await engine.close()
    static = await started(tiny_model, capacity=4, static_batches=True)
    try:
        shorts = [
            static.generate(tok.encode(f"s{i}"), Sampling(temperature=0.0, max_tokens=5)) for i in range(12)
        ]
        await asyncio.gather(
            static.generate(tok.encode("long"), Sampling(temperature=0.0, max_tokens=200)), *shorts
        )
        assert static.steps == 200 + 3 * 5, f"the static baseline took {static.steps} steps"
    finally:
        await static.close()


async def test_weights_swap_between_steps_and_bad_files_change_nothing(tiny_model, tiny_model_v1, tmp_path):
    engine = await started(tiny_model, capacity=4)
    try:
        prompt = engine.tokenizer.encode("weights")
        before = await engine.generate(prompt, Sampling(temperature=0.0, max_tokens=10))

        truncated = tmp_path / "truncated.safetensors"
        truncated.write_bytes((tiny_model_v1 / "model.safetensors").read_bytes()[:1000])
        with pytest.raises(WeightLoadError, match="not a readable"):
            await engine.update_weights(truncated, 7)

        cut = tmp_path / "cut.safetensors"  # the header is whole, the last tensor's bytes are not
        cut.write_bytes((tiny_model_v1 / "model.safetensors").read_bytes()[:-100])
        with pytest.raises(WeightLoadError, match="byte range"):
            await engine.update_weights(cut, 7)

        other = tmp_path / "other"
        from offbeat.tinymodel import build_tiny_model

        build_tiny_model(other, hidden_size=32, layers=2)
        with pytest.raises(WeightLoadError, match="shape mismatch"):
            await engine.update_weights(other / "model.safetensors", 8)
        assert engine.version == 0
        same = await engine.generate(prompt, Sampling(temperature=0.0, max_tokens=10))
        assert same.token_ids == before.token_ids

        copied = tmp_path / "v1.safetensors"
        shutil.copyfile(tiny_model_v1 / "model.safetensors", copied)
        applied = await engine.update_weights(copied, 1)
        assert applied.version == engine.version == 1 and applied.apply_s > 0
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_pretrained(tiny_model_v1, dtype=torch.float32).eval()
        after = await engine.generate(prompt, Sampling(temperature=1.0, max_tokens=16, seed=3))
        ref = teacher_forced_logprobs(fresh, prompt, after.token_ids, 1.0)
        assert (ref - torch.tensor(after.logprobs)).abs().max().item() <= 1e-3
        assert after.spans == [(1, 0, 16)]
    finally:
        await engine.close()


@pytest.mark.parametrize("checked_by", ["sha256", "chunk digests"])
async def test_a_file_that_is_not_the_announced_one_never_serves(
    tiny_model, tiny_model_v1, tmp_path, checked_by
):
    # the hash runs alongside the read, so the bytes must still be refused before they serve: a
    # flipped byte inside a tensor (the file loads fine) and a cut file (it does not) are both
    # reported as not the announced file, while a long generation goes on under version 0. With
    # chunk digests (64 KiB chunks here: ~40 of them, hashed in parallel) a flip in the first
    # chunk and one in the last are both caught, and so is a cut in the middle of a chunk.
    good = tmp_path / "v1.safetensors"
    shutil.copyfile(tiny_model_v1 / "model.safetensors", good)
    sha256 = sha256_file(good)
    chunks = chunk_digests(good, 64 * 1024) if checked_by == "chunk digests" else None
    bad_files = []
    for at in (-100, 5000):
        data = bytearray(good.read_bytes())
        data[at] ^= 0xFF
        bad_files.append(tmp_path / f"flipped{at}.safetensors")
        bad_files[-1].write_bytes(bytes(data))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    bad_files.append(cut)
    engine = await started(tiny_model, capacity=4)
    try:
        prompt = engine.tokenizer.encode("weights")
        before = await engine.generate(prompt, Sampling(temperature=0.0, max_tokens=10))
        long = asyncio.ensure_future(engine.generate(prompt, Sampling(temperature=0.0, max_tokens=600)))
        await wait_for(lambda: engine.steps >= 3, timeout_s=30)  # updates meet a busy stepping thread
        for bad in bad_files:
            with pytest.raises(ChecksumError, match="chunk" if chunks else "does not match the announced"):
                await engine.update_weights(bad, 1, sha256=sha256, chunks=chunks)
        assert engine.version == 0
        assert (await engine.generate(prompt, Sampling(temperature=0.0, max_tokens=10))).token_ids == (
            before.token_ids
        )
        applied = await engine.update_weights(good, 1, sha256=sha256, chunks=chunks)
        assert applied.version == engine.version == 1
        switched = await long
        assert [v for v, _, _ in switched.spans] == [0, 1], f"spans {switched.spans}"
        assert switched.token_ids[:10] == before.token_ids, "the refused files changed the weights"
    finally:
        await engine.close()


@pytest.mark.parametrize("hasher", ["reading thread", "second thread"])
def test_the_digest_covers_every_byte_and_each_tensor_is_its_own(tmp_path, monkeypatch, hasher):
    # padding between tensors and bytes after the last one belong to the file the sha256 names:
    # a change there is refused like a change inside a tensor, whichever thread hashes
    monkeypatch.setattr(weightfile, "THREAD_HASH_BYTES", 1 << 40 if hasher == "reading thread" else 0)
    monkeypatch.setattr(weightfile, "HASH_BATCH_BYTES", 16)  # several hand-offs even for this file
    a = torch.arange(6, dtype=torch.float32).view(2, 3)
    b = torch.tensor([1, 2, 3], dtype=torch.int64)
    header = json.dumps(
        {
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "I64", "shape": [3], "data_offsets": [32, 56]},  # 8 bytes of padding before
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    body = a.numpy().tobytes() + b"\xab" * 8 + b.numpy().tobytes() + b"trailing"
    path = tmp_path / "padded.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + body)
    sha256 = sha256_file(path)
    tensors = read_safetensors(path, sha256=sha256)
    assert torch.equal(tensors["a"], a) and torch.equal(tensors["b"], b)
    assert tensors["a"].untyped_storage().data_ptr() != tensors["b"].untyped_storage().data_ptr()
    for offset in (8 + len(header) + 24, path.stat().st_size - 1):  # in the padding, in the tail
        changed = bytearray(path.read_bytes())
        changed[offset] ^= 0x01
        other = tmp_path / f"changed-{offset}.safetensors"
        other.write_bytes(bytes(changed))
        assert torch.equal(read_safetensors(other)["b"], b), "the change was meant to miss the tensors"
        with pytest.raises(ChecksumError):
            read_safetensors(other, sha256=sha256)


async def test_updates_are_read_into_the_memory_the_last_swap_freed_never_the_live_one(
    tiny_model, tiny_model_v1, tmp_path
):
    # after two updates the engine holds two copies and alternates between them; a refused file
    # scribbles over the spare copy only, and every version serves exactly its own weights
    files, digests = {}, {}
    for v, source in ((0, tiny_model), (1, tiny_model_v1)):
        files[v] = tmp_path / f"v{v}.safetensors"
        shutil.copyfile(source / "model.safetensors", files[v])
        digests[v] = sha256_file(files[v])
    flipped = bytearray(files[0].read_bytes())
    flipped[-100] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(flipped))
    engine = await started(tiny_model, capacity=4)
    try:
        prompt = engine.tokenizer.encode("memory")
        seeded = Sampling(temperature=1.0, max_tokens=12, seed=5)

        async def sample() -> torch.Tensor:
            gen = await engine.generate(prompt, seeded)
            return torch.tensor(gen.token_ids + gen.logprobs, dtype=torch.float64)

        served = {0: await sample()}
        embedding = engine.model.get_input_embeddings().weight
        where = []
        for i, v in enumerate([1, 0, 1, 0, 1]):
            await engine.update_weights(files[v], i + 1, sha256=digests[v])
            where.append(embedding.data_ptr())
            got = served.setdefault(v, await sample())
            assert torch.allclose(await sample(), got, atol=1e-6), (
                f"version {v} serves other weights at update {i}"
            )
            if i == 1:
                with pytest.raises(ChecksumError):
                    await engine.update_weights(bad, 99, sha256=digests[0])
                assert torch.allclose(await sample(), served[0], atol=1e-6), (
                    "a refused file changed the weights"
                )
        assert not torch.allclose(served[0], served[1]), "the two versions must be told apart by the sample"
        assert where[2] == where[0] and where[3] == where[1] and where[4] == where[0], where
        assert len(set(where[:2])) == 2
    finally:
        await engine.close()


async def test_a_group_shares_its_prompt_prefill_and_samples_as_if_alone(tiny_model):
    engine = await started(tiny_model, capacity=8)
    try:
        prompt = engine.tokenizer.encode("shared prompt")
        settings = [Sampling(temperature=1.0, max_tokens=10, seed=s) for s in range(4)]
        alone = [await engine.generate(prompt, s) for s in settings]
        prefills: list[int] = []
        engine.model.register_forward_pre_hook(
            lambda _m, _a, kw: (
                prefills.append(kw["input_ids"].shape[0]) if kw["input_ids"].shape[1] > 1 else None
            ),
            with_kwargs=True,
        )
        with engine._wake:  # the stepping thread waits until all five are queued, as under load
            tasks = [asyncio.ensure_future(engine.generate(prompt, s)) for s in settings]
            other = engine.tokenizer.encode("other")
            tasks.append(
                asyncio.ensure_future(engine.generate(other, Sampling(temperature=0.0, max_tokens=10)))
            )
            await asyncio.sleep(0)
        together = await asyncio.gather(*tasks)
        assert prefills == [2], (
            f"prefill rows {prefills}: five sequences of two prompts, one pass of two rows"
        )
        for a, b in zip(alone, together, strict=False):
            assert b.token_ids == a.token_ids, "a sample changed when its prompt's prefill was shared"
            assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
        assert len({tuple(g.token_ids) for g in together[:4]}) > 1, "the rows are copies of one sample"
    finally:
        await engine.close()


async def test_cancelling_running_and_queued_samples_leaves_the_engine_serving(tiny_model):
    # a group of 4 on capacity 2, all cancelled (a sibling's publish failed): the step after the
    # running rows were dropped found only cancelled samples waiting, and the engine thread died
    engine = await started(tiny_model, capacity=2)
    try:
        tasks = [
            asyncio.ensure_future(engine.generate([5, 6, 7], Sampling(max_tokens=400, seed=i)))
            for i in range(4)
        ]
        await wait_for(lambda: engine.steps >= 3, timeout_s=30)
        assert engine._waiting, "the samples beyond capacity should still be queued"
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await wait_for(lambda: engine.in_flight == 0, timeout_s=30)
        gen = await asyncio.wait_for(engine.generate([5, 6], Sampling(max_tokens=3, seed=9)), 30)
        assert len(gen.token_ids) == 3 and gen.finish_reason == "length"
        assert engine.failure is None
    finally:
        await engine.close()


def test_the_smallest_accepted_temperature_samples_the_argmax_with_a_finite_logprob():
    torch.manual_seed(0)
    logits = torch.randn(3, 300) * 5
    top = torch.tensor([17, 123, 250])
    logits[torch.arange(3), top] = logits.amax(dim=-1) + 1
    logits[2] *= 1e35  # logits / T would overflow float32 here even at MIN_TEMPERATURE
    for temperature in (MIN_TEMPERATURE, 1e-40):
        rows = [RowSampling(temperature, 1.0, 0, random.Random(i)) for i in range(3)]
        tokens, logprobs = sample(logits, rows)
        assert tokens.tolist() == top.tolist()
        assert torch.isfinite(logprobs).all() and logprobs.abs().max() < 1e-6, logprobs
