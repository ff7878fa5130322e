"""`offbeat env list` and `offbeat env show NAME [--n 3]`: what environments exist, what they ask.

`show` prints sample prompts with their reference answers (for code: the reference solution and
how many hidden tests there are; the tests themselves are not printed, as they are never shown to
the policy either). `--arg key=value` passes keyword arguments to `offbeat.envs.load` (values are
TOML literals when they parse).

Not covered: scoring from the command line.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="env_command", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="print the names `offbeat.envs.load` accepts")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    show = sub.add_parser("show", help="print sample prompts and answers of an environment")
    show.add_argument("name", help="e.g. math, code, reasoning_gym:basic_arithmetic")
    show.add_argument("--n", type=int, default=3, help="how many examples")
    show.add_argument("--split", default="train", choices=["train", "eval"])
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--arg", action="append", default=[], metavar="K=V", help="argument for load()")
    show.add_argument("--json", action="store_true", help="one JSON object per example")


def _prompt_text(prompt: object) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"[{m['role']}] {m['content']}" for m in prompt)  # type: ignore[attr-defined]


def main(args: argparse.Namespace) -> int:
    from offbeat import envs
    from offbeat.config import parse_value

    if args.env_command == "list":
        names = envs.available()
        print(json.dumps(names) if args.json else "\n".join(names))
        return 0
    kwargs = {}
    for item in args.arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--arg {item!r}: expected key=value")
        kwargs[key] = parse_value(value)
    try:
        env = envs.load(args.name, **kwargs)
    except (KeyError, ValueError, TypeError) as exc:
        print(f"offbeat env show: {exc}", file=sys.stderr)
        return 2
    shown = 0
    for example in env.examples(args.split, args.seed):
        if shown >= args.n:
            break
        shown += 1
        if args.json:
            print(
                json.dumps(
                    {
                        "key": example.key,
                        "prompt": example.prompt,
                        "answer": example.answer,
                        "hidden_tests": len(example.tests),
                    }
                )
            )
            continue
        print(f"--- {env.name} {example.key}")
        print(_prompt_text(example.prompt))
        print(f">>> answer: {example.answer}")
        if example.tests:
            print(f">>> hidden tests: {len(example.tests)}")
    return 0
