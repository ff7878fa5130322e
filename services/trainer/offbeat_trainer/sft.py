"""Supervised fine-tuning (warm start before RL) with the RL trainer's own machinery.

Examples are prompt/completion pairs from a JSONL file or an environment's reference answers
(`offbeat.envs.load(name).examples("train")`, completion = `--answer-template` filled with the
answer). A chat prompt (a list of messages) is rendered with the tokenizer's chat template and a
generation prompt, exactly as inference renders it; a text prompt is tokenized as is. The
completion is followed by the EOS token. Training uses `TrainCore` with `sft_loss` (NLL of the
completion tokens, token-normalised), the same packing, optimizer and schedule as RL, and the
same checkpoint format (`OUT/checkpoint/ckpt-*`); the model is saved with `save_pretrained` to
`OUT` together with the tokenizer, so `OUT` works as `[model] path`.

A warm start before RL should stop where RL still has something to learn, and a step count is a
poor way to say where: mid-way through learning a task, a few steps or a change of numerics (a
different CPU, another kernel) move the model a long way. With `--target-match P` and
`--held-out` pairs, every `--check-every` steps the model's **match** is measured: the mean over
the held-out pairs of the probability that decoding reproduces the reference completion exactly,
EOS included. Greedy decoding (`--match-temperature 0`, the default, as evals usually decode):
1 where every completion token is the argmax given the reference before it, else 0 (teacher
forcing gives exactly what greedy generation would). Sampling at T > 0: exp of the summed
completion log-probs at T. One no-grad forward pass either way, no sampling noise. Training
stops at the first check that reaches P (`--steps` is then the most it may take), and
`OUT/sft.json` records where it stopped.

Not covered: multi-epoch schedules, distributed SFT, rewards other than an exact match (the
match probability bounds an environment's reward from below where a completion other than the
reference also scores).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from offbeat_trainer.batching import Trajectory
from offbeat_trainer.checkpoint import Checkpoints, TrainerState, VersionRecord, save_weights
from offbeat_trainer.packing import pack
from offbeat_trainer.train import CoreSettings, TrainCore, completion_logits, load_model

log = logging.getLogger("offbeat.trainer.sft")


def read_jsonl(path: str) -> list[tuple[Any, str]]:
    pairs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row or "completion" not in row:
                raise SystemExit(f"{path}:{n}: needs 'prompt' and 'completion'")
            pairs.append((row["prompt"], str(row["completion"])))
    return pairs


def load_pairs(args: argparse.Namespace) -> list[tuple[Any, str]]:
    if args.data:
        return read_jsonl(args.data)
    from offbeat.envs import load

    env = load(args.env)
    pairs = []
    for ex in env.examples("train", seed=args.seed):
        if ex.answer is not None:
            pairs.append((ex.prompt, args.answer_template.format(answer=ex.answer)))
        if len(pairs) >= args.env_examples:
            break
    if not pairs:
        raise SystemExit(f"environment {args.env!r} has no reference answers in its train split")
    return pairs


def encode(tokenizer: Any, prompt: Any, completion: str) -> tuple[list[int], list[int]]:
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    else:
        text = str(prompt)
    p = tokenizer(text, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p, c


def to_trajectories(tokenizer: Any, pairs: list[tuple[Any, str]], max_len: int, tag: str) -> list[Trajectory]:
    out = []
    for i, (prompt, completion) in enumerate(pairs):
        p, c = encode(tokenizer, prompt, completion)
        if len(p) + len(c) <= max_len and p:
            out.append(
                Trajectory(f"{tag}-{i}", f"{tag}-{i}", 1, p, c, [0.0] * len(c), 0.0, "ok", 0, advantage=1.0)
            )
    return out


def match_probability(
    model: Any, examples: list[Trajectory], *, temperature: float, budget: int, device: torch.device
) -> float:
    """Mean over `examples` of P(decoding reproduces the completion exactly): greedy at
    temperature 0, else sampling at `temperature`."""
    total = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for mb in pack(examples, budget=budget, normalize="token", layout="padded"):
                mb = mb.to(device)
                logits = completion_logits(model, mb)
                if temperature == 0:
                    token = (logits.argmax(-1) == mb.targets).double().log()  # 0 or -inf
                else:
                    token = (
                        F.log_softmax(logits / temperature, -1).gather(-1, mb.targets[:, None])[:, 0].double()
                    )
                per_row = torch.zeros(mb.input_ids.shape[0], dtype=torch.float64, device=token.device)
                per_row.index_add_(0, mb.rows, token)
                total += float(per_row.exp().sum())
    finally:
        model.train(was_training)
    return total / len(examples)


def run_sft(args: argparse.Namespace) -> Path:
    from transformers import AutoTokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s sft %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    examples = to_trajectories(tokenizer, load_pairs(args), args.max_len, "sft")
    if not examples:
        raise SystemExit("no usable examples (empty prompts or all longer than --max-len)")
    held_out: list[Trajectory] = []
    if args.held_out:
        held_out = to_trajectories(tokenizer, read_jsonl(args.held_out), args.max_len, "held-out")
        if not held_out:
            raise SystemExit(f"--held-out {args.held_out}: no usable pairs")
    torch.manual_seed(args.seed)
    model = load_model(args.model)
    settings = CoreSettings(
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        loss="offbeat_trainer.loss:sft_loss",
        micro_batch_tokens=args.micro_batch_tokens,
        activation_checkpointing=args.activation_checkpointing,
        # each example is its own group: nothing to share, so the plain rows (and their numerics,
        # which the cached warm starts of the examples were measured with)
        layout="padded",
    )
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    core = TrainCore(model, settings, device=device)
    rng = random.Random(args.seed)
    order: list[int] = []
    started = time.perf_counter()
    match: float | None = None
    step = 0
    for step in range(1, args.steps + 1):
        batch: list[Trajectory] = []
        while len(batch) < min(args.batch_size, len(examples)):
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        metrics = core.step(batch)
        if step == 1 or step % 10 == 0 or step == args.steps:
            log.info(
                "step %d/%d nll %.4f grad_norm %.3f tokens/s %.0f (%.0fs)",
                step,
                args.steps,
                metrics["loss"],
                metrics["grad_norm"],
                metrics["tokens_per_s"],
                time.perf_counter() - started,
            )
        if held_out and (step % args.check_every == 0 or step == args.steps):
            match = match_probability(
                core.module,
                held_out,
                temperature=args.match_temperature,
                budget=args.micro_batch_tokens,
                device=device,
            )
            log.info("step %d match probability %.4f on %d held-out pairs", step, match, len(held_out))
            if args.target_match is not None and match >= args.target_match:
                log.info("target match %.4f reached at step %d: stopping", args.target_match, step)
                break
    model_sd, opt_sd = core.full_state()
    ckpts = Checkpoints(out / "checkpoint", keep=1)
    tmp = save_weights(model_sd, ckpts.root / ".weights-sft.safetensors")
    state = TrainerState(step=step, versions={0: VersionRecord(step=0, parent=-1)})
    ckpts.save(state, weights_file=tmp, optimizer=opt_sd, scheduler=core.scheduler.state_dict())
    core.module.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    summary = {
        "steps": step,
        "max_steps": args.steps,
        "target_match": args.target_match,
        "match": match,
        "held_out": len(held_out),
        "reached": match is not None and args.target_match is not None and match >= args.target_match,
    }
    (out / "sft.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.info("wrote %s (%s)", out, summary)
    return out
