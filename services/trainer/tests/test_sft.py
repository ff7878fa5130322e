"""`offbeat-trainer sft` learns its pairs and writes a model directory usable as [model] path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent

PAIRS = [
    ({"role": "user", "content": "2+2"}, "4"),
    ({"role": "user", "content": "3+5"}, "8"),
    ("capital of France:", " Paris"),
    ("abc", "def"),
]


def sft(tiny_model: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`offbeat-trainer sft --model <tiny model> ARGS`, as a user runs it."""
    cmd = [str(BIN / "offbeat-trainer"), "sft", "--model", str(tiny_model), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_sft_memorises_pairs_and_output_loads(tiny_model, tmp_path):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"prompt": [p] if isinstance(p, dict) else p, "completion": c}) for p, c in PAIRS
        )
        + "\n"
    )
    out = tmp_path / "sft"
    run = sft(
        tiny_model,
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "80",
        "--lr",
        "3e-3",
        "--batch-size",
        "4",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "checkpoint").is_dir() and any((out / "checkpoint").iterdir())
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    for prompt, completion in PAIRS:
        text = (
            tok.apply_chat_template([prompt], add_generation_prompt=True, tokenize=False)
            if isinstance(prompt, dict)
            else prompt
        )
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=len(completion) + 1, do_sample=False)
        got = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        assert got == completion, f"{prompt!r}: generated {got!r}, trained on {completion!r}"


def test_sft_from_environment_reference_answers(tiny_model, tmp_path):  # type: ignore[no-untyped-def]
    from offbeat.envs import load

    examples = [ex for ex, _ in zip(load("math").examples("train"), range(4), strict=False)]
    assert all(ex.answer for ex in examples), "math env examples lack reference answers"
    out = tmp_path / "sft-env"
    run = sft(
        tiny_model,
        "--env",
        "math",
        "--env-examples",
        "8",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--out",
        str(out),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 2/2" in run.stderr
    state = json.loads(next((out / "checkpoint").glob("ckpt-*/state.json")).read_text())
    assert state["step"] == 2
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_match_probability_is_each_pairs_own_probability(tiny_model, temperature):  # type: ignore[no-untyped-def]
    """Batched and padded, the match equals each pair's own forward pass; greedy, it is 1 for a
    completion the model generates itself and 0 for one token changed."""
    import math

    import torch
    from offbeat_trainer.batching import Trajectory
    from offbeat_trainer.sft import match_probability
    from offbeat_trainer.train import load_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    model = load_model(str(tiny_model))
    prompts = ["2+2=", "a much longer prompt than the others, to pad the rest", "xyz"]
    examples = []
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=3 + i, do_sample=False, eos_token_id=None)
        own = gen[0, ids.shape[1] :].tolist()
        changed = [*own[:-1], (own[-1] + 1) % model.config.vocab_size]
        for completion in (own, changed):
            examples.append(
                Trajectory(
                    f"t{len(examples)}",
                    "g",
                    1,
                    ids[0].tolist(),
                    completion,
                    [0.0] * len(completion),
                    0.0,
                    "ok",
                    0,
                )
            )
    got = match_probability(model, examples, temperature=temperature, budget=64, device=torch.device("cpu"))

    def own_probability(t) -> float:  # type: ignore[no-untyped-def]
        ids = torch.tensor([t.prompt_ids + t.completion_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(t.prompt_ids) - 1 : -1].float()
        target = torch.tensor(t.completion_ids)
        if temperature == 0:
            return float(bool((logits.argmax(-1) == target).all()))
        return math.exp(float(torch.log_softmax(logits / temperature, -1).gather(-1, target[:, None]).sum()))

    expected = [own_probability(t) for t in examples]
    assert got == pytest.approx(sum(expected) / len(expected), rel=1e-4, abs=1e-9)
    if temperature == 0:
        assert expected == [1.0, 0.0] * len(prompts)
        assert got == 0.5


def _sft(tiny_model, tmp_path, data, held_out, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    run = sft(
        tiny_model,
        "--data",
        str(data),
        "--held-out",
        str(held_out),
        "--out",
        str(out),
        "--lr",
        "3e-3",
        "--batch-size",
        "4",
        *extra,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "sft.json").read_text())
    state = json.loads(next((out / "checkpoint").glob("ckpt-*/state.json")).read_text())
    assert state["step"] == summary["steps"]
    return run, summary


def test_sft_stops_at_the_target_match_and_not_before(tiny_model, tmp_path):  # type: ignore[no-untyped-def]
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS if isinstance(p, str))
    )
    run, summary = _sft(
        tiny_model, tmp_path, data, data, "--steps", "300", "--target-match", "1.0", "--check-every", "5"
    )
    assert summary["reached"] and summary["match"] == 1.0
    assert summary["steps"] < 300 and summary["steps"] % 5 == 0
    checks = [line for line in run.stderr.splitlines() if "match probability" in line]
    assert len(checks) == summary["steps"] // 5  # stopped at the first check that reached it
    assert all("match probability 1.0000" not in line for line in checks[:-1])


def test_sft_with_an_unreachable_target_runs_every_step_and_says_so(tiny_model, tmp_path):  # type: ignore[no-untyped-def]
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "abc", "completion": "def"}) + "\n")
    held_out = tmp_path / "held.jsonl"
    held_out.write_text(json.dumps({"prompt": "qrs", "completion": "a reply it never sees"}) + "\n")
    _, summary = _sft(tiny_model, tmp_path, data, held_out, "--steps", "6", "--target-match", "0.9")
    assert summary == {
        "steps": 6,
        "max_steps": 6,
        "target_match": 0.9,
        "match": summary["match"],
        "held_out": 1,
        "reached": False,
    }
    assert summary["match"] < 0.9


def test_sft_target_match_needs_held_out_pairs(tiny_model, tmp_path):  # type: ignore[no-untyped-def]
    run = sft(
        tiny_model,
        "--env",
        "math",
        "--out",
        str(tmp_path),
        "--target-match",
        "0.3",
        timeout=60,
    )
    assert run.returncode == 2 and "--target-match needs --held-out" in run.stderr
