"""Answer parsers and format rewards."""

import pytest

from offbeat.envs.parsers import (
    AnswerTag,
    boxed,
    code_block,
    last_number,
    make_format,
    make_parser,
    think_answer_format,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 3 then 42", "42"),
        ("total: 1,234.5.", "1234.5"),
        ("-7", "-7"),
        ("x = .5", ".5"),
        ("none", None),
        ("1e3", "1e3"),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_answer_tag_takes_the_last_closed_tag():
    parse = AnswerTag()
    assert parse("<answer>1</answer> <answer> 2 </answer>") == "2"
    assert parse("<answer>1") is None
    assert parse("<answer></answer>") == ""
    assert AnswerTag("final")("<final>x</final>") == "x"


def test_boxed_balances_braces():
    assert boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert boxed("\\boxed{\\frac{1}{2}") is None
    assert boxed("no box") is None
    assert boxed("\\fbox{3}") == "3"


def test_code_block_prefers_the_last_python_block():
    text = "```python\ndef f(): return 1\n```\ntext\n```\nplain\n```\n```py\ndef f(): return 2\n```"
    assert code_block(text) == "def f(): return 2\n"
    assert code_block("```\nonly plain\n```") == "only plain\n"
    assert code_block("def f(): return 1") is None
    assert code_block("```python\n   \n```") is None


def test_make_parser_from_config():
    assert make_parser("boxed")("\\boxed{4}") == "4"
    assert make_parser({"kind": "answer_tag", "tag": "a"})("<a>5</a>") == "5"
    with pytest.raises(ValueError, match="unknown parser"):
        make_parser("nope")


def test_format_rewards():
    assert think_answer_format("<think>hm</think>\n<answer>3</answer>") == 1.0
    assert think_answer_format("<answer>3</answer>") == 0.0
    assert think_answer_format("<think>a</think><answer>1</answer><answer>2</answer>") == 0.0
    assert think_answer_format("<think>x</think><answer></answer>") == 0.0  # no answer, no credit
    assert think_answer_format("<think>x</think><answer> </answer>") == 0.0
    has = make_format("has_answer", make_parser("boxed"))
    assert has("\\boxed{1}") == 1.0 and has("1") == 0.0
