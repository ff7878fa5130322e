"""Supervised fine-tuning (warm start before RL) with the RL trainer's own machinery.

Examples are prompt/completion pairs from a JSONL file or an environment's reference answers
(`offbeat.envs.load(name).examples("train")`, completion = `--answer-template` filled with the
answer). A chat prompt (a list of messages) is rendered with the tokenizer's chat template and a
generation prompt, exactly as inference renders it; a text prompt is tokenized as is. The
completion is followed by the EOS token. Training uses `TrainCore` with `sft_loss` (NLL of the
completion tokens, token-normalised), the same packing, optimizer and schedule as RL, and the
same checkpoint format (`OUT/checkpoint/ckpt-*`); the model is saved with `save_pretrained` to
`OUT` together with the tokenizer, so `OUT` works as `[model] path`.

Not covered: multi-epoch schedules, evaluation during SFT, distributed SFT.
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

from offbeat_trainer.batching import Trajectory
from offbeat_trainer.checkpoint import Checkpoints, TrainerState, VersionRecord, save_weights
from offbeat_trainer.train import CoreSettings, TrainCore, load_model

log = logging.getLogger("offbeat.trainer.sft")


def load_pairs(args: argparse.Namespace) -> list[tuple[Any, str]]:
    if args.data:
        pairs = []
        with open(args.data) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "prompt" not in row or "completion" not in row:
                    raise SystemExit(f"{args.data}:{n}: needs 'prompt' and 'completion'")
                pairs.append((row["prompt"], str(row["completion"])))
        return pairs
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


def run_sft(args: argparse.Namespace) -> Path:
    from transformers import AutoTokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s sft %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    examples = []
    for i, (prompt, completion) in enumerate(load_pairs(args)):
        p, c = encode(tokenizer, prompt, completion)
        if len(p) + len(c) <= args.max_len and p:
            examples.append(
                Trajectory(f"sft-{i}", f"sft-{i}", 1, p, c, [0.0] * len(c), 0.0, "ok", 0, advantage=1.0)
            )
    if not examples:
        raise SystemExit("no usable examples (empty prompts or all longer than --max-len)")
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
    model_sd, opt_sd = core.full_state()
    ckpts = Checkpoints(out / "checkpoint", keep=1)
    tmp = save_weights(model_sd, ckpts.root / ".weights-sft.safetensors")
    state = TrainerState(step=args.steps, versions={0: VersionRecord(step=0, parent=-1)})
    ckpts.save(state, weights_file=tmp, optimizer=opt_sd, scheduler=core.scheduler.state_dict())
    core.module.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    log.info("wrote %s", out)
    return out
