"""The grader's pure parts: the assert rewrite, tagged plain data, exact-type comparison."""

from __future__ import annotations

import ast

import pytest
from offbeat_sandbox.grader import (
    InvalidRequest,
    check_assert,
    decode,
    normalize_stdout,
    rewrite_asserts,
    typed,
)
from offbeat_sandbox.worker_main import encode


def test_literal_comparands_are_kept_out_of_the_sent_code() -> None:
    code, plans = rewrite_asserts("assert f(2) == 12345\nassert 'needle' in g()\nassert h() is None, 'msg'")
    assert "12345" not in code and "needle" not in code and "msg" not in code
    assert "None" not in code
    assert [p.kind for p in plans.values()] == ["compare", "compare", "compare"]
    ast.parse(code)


def test_asserts_inside_functions_and_loops_are_rewritten() -> None:
    src = "def check(candidate):\n    for i in range(3):\n        assert candidate(i) == 'xyz'\n        assert candidate(i) != [i]\ncheck(f)\n"
    code, plans = rewrite_asserts(src)
    assert not any(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(code)))
    assert "xyz" not in code
    assert [p.recorded for p in plans.values()] == [1, 2]  # `[i]` is not a literal: recorded


def test_check_assert_compares_with_exact_types() -> None:
    _, plans = rewrite_asserts("assert f() == 1")
    assert check_assert(plans[0], [1])[0]
    assert not check_assert(plans[0], [1.0])[0]
    assert not check_assert(plans[0], [True])[0]
    _, plans = rewrite_asserts("assert f() == (1, 2)")
    assert check_assert(plans[0], [(1, 2)])[0]
    assert not check_assert(plans[0], [[1, 2]])[0]


def test_chained_ordering_membership_identity_and_truth() -> None:
    _, plans = rewrite_asserts(
        "assert 0 < f() <= 10\nassert f() in [1, 2]\nassert f() is None\nassert g()\nassert not g()"
    )
    assert check_assert(plans[0], [5])[0] and not check_assert(plans[0], [11])[0]
    assert not check_assert(plans[0], ["5"])[0]  # ordering a str against ints is not graded as true
    assert check_assert(plans[1], [2])[0] and not check_assert(plans[1], [2.0])[0]
    assert check_assert(plans[2], [None])[0] and not check_assert(plans[2], [0])[0]
    assert check_assert(plans[3], [True])[0] and not check_assert(plans[3], [1])[0]
    assert check_assert(plans[4], [False])[0] and not check_assert(plans[4], [None])[0]


def test_non_literal_operands_are_all_recorded() -> None:
    _, plans = rewrite_asserts("assert f(1) == f(2) - 1")
    assert plans[0].recorded == 2
    assert check_assert(plans[0], [3, 3])[0]
    assert not check_assert(plans[0], [3])[0]  # a record missing a value fails


def test_tagged_plain_data_round_trips_with_exact_types() -> None:
    value = {
        "a": [1, 2.5, True, None, "s"],
        3: (b"x", frozenset({1})),
        (1, 2): {4: -0.0},
        "c": 1 + 2j,
        "big": 10**40,
    }
    back = decode(encode(value))
    assert typed(back) == typed(value)
    assert type(back["a"][0]) is int and type(back["a"][2]) is bool and type(back[3]) is tuple


def test_encode_refuses_anything_but_plain_data() -> None:
    class Int(int):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = int.__hash__

    for bad in (Int(3), object(), [1, Int(2)], {"k": lambda: 1}):
        with pytest.raises(TypeError):
            encode(bad)


def test_decode_refuses_malformed_records() -> None:
    for bad in ({"x": 1}, {"i": 3}, {"l": "no"}, {"d": [[1]]}, {"s": [{"l": []}]}, [1, 2]):
        with pytest.raises(ValueError):
            decode(bad)


def test_function_values_read_tuples_as_json_lists() -> None:
    assert typed((1, [2]), json_view=True) == typed([1, [2]], json_view=True)
    assert typed(1, json_view=True) != typed(1.0, json_view=True)


def test_stdout_normalization_ignores_trailing_whitespace_only() -> None:
    assert normalize_stdout(b"1 2  \r\n3\n\n\n") == normalize_stdout(b"1 2\n3")
    assert normalize_stdout(b" 1") != normalize_stdout(b"1")


def test_unparsable_assert_code_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        rewrite_asserts("assert (")


def test_replies_are_cut_to_fit_the_bus() -> None:
    from offbeat_sandbox.service import fit_reply

    from offbeat.v1 import sandbox_pb2 as pb

    big = pb.SandboxExecResult(stdout=b"o" * 900_000, stderr=b"e" * 900_000, tests=[pb.TestResult(index=0)])
    fitted = fit_reply(big, 1024 * 1024)
    assert fitted.ByteSize() <= 1024 * 1024
    assert fitted.stdout_truncated and fitted.stderr_truncated and fitted.stdout.startswith(b"ooo")
    small = pb.SandboxExecResult(stdout=b"1\n")
    assert fit_reply(small, 1024 * 1024) == pb.SandboxExecResult(stdout=b"1\n")
