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
    run = subprocess.run(
        [
            str(BIN / "offbeat-trainer"),
            "sft",
            "--model",
            str(tiny_model),
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
        ],
        capture_output=True,
        text=True,
        timeout=300,
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
    run = subprocess.run(
        [
            str(BIN / "offbeat-trainer"),
            "sft",
            "--model",
            str(tiny_model),
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
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 2/2" in run.stderr
    state = json.loads(next((out / "checkpoint").glob("ckpt-*/state.json")).read_text())
    assert state["step"] == 2
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
