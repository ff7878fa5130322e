"""Answer extraction from completions, and format rewards usable as a component of any environment.

Parsers turn a completion into the answer string the rubric judges, or None when there is none:
`last_number`, `answer_tag` (`<answer>...</answer>`, the last one; the same rule as
reasoning-gym's `extract_answer`), `boxed` (the last `\\boxed{...}` with balanced braces) and
`code_block` (the last fenced code block, preferring ```python). `make_parser("answer_tag")` or
`make_parser({"kind": "answer_tag", "tag": "final"})` builds one from config.

The answer parsers (not `code_block`: NFKC would rewrite a program's string literals) read the
text NFKC-normalised, with every Unicode decimal digit made ASCII, so a model writing full-width
`１２３` or Arabic-Indic `١٢٣` gives `123` (NFKC alone leaves Arabic-Indic digits as they are), and `−5` (U+2212) gives `-5`.
Superscripts, subscripts and vulgar fractions are left alone: NFKC would turn `25 m²` into `25 m2`
(whose last number is 2, and which math-verify no longer reads as 25) and `½` into `1⁄2`.

Format rewards score the shape of a completion (0..1), not its correctness:
`think_answer_format` (a `<think>` block followed by one `<answer>` block) and
`has_answer_format` (the parser found something).

Not covered: judging the answer (each environment's rubric does that).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import groupby
from typing import Any

Parser = Callable[[str], str | None]

_KEEP = ("<super>", "<sub>", "<fraction>")
_NON_ASCII_DIGIT = re.compile(r"(?![0-9])\d")


def _normalize(text: str) -> str:
    """NFKC, except superscripts, subscripts and vulgar fractions; then U+2212 as `-` and Unicode
    decimal digits as ASCII."""
    if text.isascii():
        return text
    if not unicodedata.is_normalized("NFKC", text):
        runs = groupby(text, key=lambda ch: unicodedata.decomposition(ch).startswith(_KEEP))
        text = "".join("".join(r) if kept else unicodedata.normalize("NFKC", "".join(r)) for kept, r in runs)
    text = text.replace("\u2212", "-")  # the minus sign (typeset maths) is a hyphen-minus to the parsers
    return _NON_ASCII_DIGIT.sub(lambda m: str(unicodedata.decimal(m.group())), text)


_NUMBER = re.compile(
    r"(?:(?<![0-9A-Za-z])-)?"
    r"(?:(?:(?<!\d,)\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+)"
)


def last_number(text: str) -> str | None:
    """The last number in the (normalised) text: an integer or decimal, optionally with an exponent
    (`1e3`) or a leading `-`, with thousands separators removed (`1,234.5` -> `1234.5`).

    Commas count as thousands separators only in proper groups (`1,234,567`); otherwise they separate
    a list (`1,2,3` -> `3`). A `-` directly after an ASCII letter or digit is a range or a difference,
    not a sign (`1-5`, `x-5` -> `5`). A fraction `1/2` reads as its last number, `2`.
    """
    matches = _NUMBER.findall(_normalize(text))
    return matches[-1].replace(",", "") if matches else None


@dataclass(frozen=True)
class AnswerTag:
    """The content of the last `<tag>...</tag>`, stripped; None when there is no closed tag."""

    tag: str = "answer"

    def __call__(self, text: str) -> str | None:
        tag = re.escape(self.tag)
        matches = re.findall(rf"<{tag}>\s?(.*?)\s?</{tag}>", _normalize(text), re.DOTALL)
        return matches[-1].strip() if matches else None


def boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if absent.

    Also None when the last box is never closed, even after a complete earlier one: a completion cut
    off inside its last box has not given its final answer, and the earlier box is one it moved past.
    """
    text = _normalize(text)
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def code_block(text: str) -> str | None:
    """The last fenced code block tagged python (or untagged, if none is tagged); None if absent."""
    blocks = _FENCE.findall(text)
    if not blocks:
        return None
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    chosen = python[-1] if python else blocks[-1][1]
    return chosen if chosen.strip() else None


PARSERS: dict[str, Callable[..., Parser]] = {
    "last_number": lambda: last_number,
    "answer_tag": lambda tag="answer": AnswerTag(tag),
    "boxed": lambda: boxed,
    "code_block": lambda: code_block,
}


def make_parser(spec: str | Mapping[str, Any] | Parser) -> Parser:
    """A parser from a name (`"boxed"`), a mapping (`{"kind": "answer_tag", "tag": "final"}`) or itself."""
    if callable(spec):
        return spec
    if isinstance(spec, str):
        kind, kwargs = spec, {}
    else:
        kwargs = dict(spec)
        kind = kwargs.pop("kind", "")
    if kind not in PARSERS:
        raise ValueError(f"unknown parser {kind!r}; expected one of {sorted(PARSERS)}")
    return PARSERS[kind](**kwargs)


_THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>(?:(?!<answer>).)*?</answer>\s*$", re.DOTALL)


def think_answer_format(completion: str) -> float:
    """1.0 when the completion is `<think>...</think>` then exactly one `<answer>...</answer>` with
    something in it, else 0 (an empty answer earns no format credit)."""
    shaped = _THINK_ANSWER.match(completion) and completion.count("<answer>") == 1
    return 1.0 if shaped and AnswerTag()(completion) else 0.0


def has_answer_format(parser: Parser) -> Callable[[str], float]:
    """1.0 when `parser` finds an answer in the completion, else 0."""
    return lambda completion: 0.0 if parser(completion) is None else 1.0


FORMATS: dict[str, Callable[[Parser], Callable[[str], float]]] = {
    "think_answer": lambda parser: think_answer_format,
    "has_answer": has_answer_format,
}


def make_format(name: str, parser: Parser) -> Callable[[str], float]:
    """A format reward by name (`think_answer`, `has_answer`) for an environment using `parser`."""
    if name not in FORMATS:
        raise ValueError(f"unknown format reward {name!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[name](parser)


@dataclass(frozen=True)
class FormatComponent:
    """A format reward added to an environment's total: `total += weight * format(completion)`."""

    reward: Callable[[str], float]
    weight: float

    @classmethod
    def build(cls, name: str | None, weight: float, parser: Parser) -> FormatComponent | None:
        return None if name is None else cls(make_format(name, parser), weight)

    def apply(self, components: dict[str, float], total: float, completion: str) -> float:
        score = self.reward(completion)
        components["format"] = score
        return total + self.weight * score
