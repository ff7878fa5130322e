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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234,567", "1234567"),
        ("12,345 and 1,000.25", "1000.25"),
        ("1,2,3", "3"),
        ("1,23", "23"),
        ("1,2,345", "345"),
        ("-5", "-5"),
        ("= -5", "-5"),
        ("(-5)", "-5"),
        ("answer: -3.5", "-3.5"),
        ("1/2", "2"),
        ("1e-5", "1e-5"),
    ],
)
def test_last_number_commas_only_in_thousands_groups_and_signs_kept(text, expected):
    assert last_number(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("1-5", "5"), ("x-5", "5"), ("2024-01-15", "15")])
def test_last_number_a_minus_after_a_digit_or_letter_is_not_a_sign(text, expected):
    assert last_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("答案是１２３", "123"),
        ("答案是－５", "-5"),
        ("x = \u22125", "-5"),
        ("\u22122.5e\u22123", "-2.5e-3"),
        ("الجواب ١٢٣", "123"),
        ("۴۲", "42"),
        ("area 25 m²", "25"),
        ("½", None),
    ],
)
def test_last_number_normalises_unicode_digits_but_not_superscripts(text, expected):
    assert last_number(text) == expected


def test_answer_parsers_normalise_unicode_digits():
    assert boxed("\\boxed{１２３}") == "123"
    assert boxed("＼boxed｛٤٢｝") == "42"
    assert boxed("\\boxed{25 m²}") == "25 m²"
    assert AnswerTag()("<answer>１２３</answer>") == "123"
    assert code_block("```python\nprint('１２３')\n```") == "print('１２３')\n"


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


def test_boxed_is_none_when_the_last_box_is_cut_off_after_a_complete_one():
    assert boxed("\\boxed{5}, no wait: \\boxed{\\frac{7}{") is None
    assert boxed("\\boxed{5}, no wait: \\fbox{7") is None


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
