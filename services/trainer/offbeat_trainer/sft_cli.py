"""`offbeat-trainer sft`: argument parsing only; torch is imported after the arguments parse."""

from __future__ import annotations

import argparse
import os


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="offbeat-trainer sft",
        description="Supervised fine-tuning on prompt/completion pairs (JSONL) or on an environment's "
        "reference answers; writes a Hugging Face model directory usable as [model] path.",
    )
    p.add_argument("--model", required=True, help="base model: HF directory (or hub id where reachable)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--data", help='JSONL, one {"prompt": str | [chat messages], "completion": str} per line'
    )
    src.add_argument(
        "--env", help="environment name for offbeat.envs.load (its train split's reference answers)"
    )
    p.add_argument("--env-examples", type=int, default=1000, help="examples taken from --env")
    p.add_argument("--answer-template", default="{answer}", help="completion text made from an env answer")
    p.add_argument("--out", required=True, help="output directory (model, tokenizer, checkpoint/)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (the most, with --target-match)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    p.add_argument(
        "--micro-batch-tokens", type=int, default=8192, help="token budget of a packed micro-batch"
    )
    p.add_argument("--max-len", type=int, default=4096, help="drop examples longer than this (tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed for example order")
    p.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute activations in backward"
    )
    p.add_argument("--held-out", help="JSONL pairs (as --data) to measure the match probability on")
    p.add_argument(
        "--target-match",
        type=float,
        help="stop at the first check where the mean probability that decoding reproduces a "
        "held-out reference exactly reaches this (needs --held-out)",
    )
    p.add_argument("--check-every", type=int, default=10, help="steps between match checks")
    p.add_argument(
        "--match-temperature",
        type=float,
        default=0.0,
        help="decoding of the match check: 0 greedy (default), else sampling at this temperature",
    )
    return p


def main(argv: list[str]) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.target_match is not None and not args.held_out:
        p.error("--target-match needs --held-out")
    if args.target_match is not None and not 0 < args.target_match <= 1:
        p.error(f"--target-match {args.target_match}: a probability in (0, 1]")
    if args.check_every < 1 or args.steps < 1 or args.match_temperature < 0:
        p.error("--check-every and --steps must be >= 1, --match-temperature >= 0")
    for flag, path in (("--data", args.data), ("--held-out", args.held_out)):
        if path and not os.path.isfile(path):
            p.error(f"{flag} {path}: no such file")
    from offbeat.service import missing_local_dir

    if missing_local_dir(args.model):
        p.error(f"--model {args.model}: not a directory")
    from offbeat_trainer.sft import run_sft

    run_sft(args)
