"""Test mode on the host side: what enters the sandbox, and how a test passes.

A request's tests become units of one worker job, each run in its own fresh forked child:

- stdin/stdout test: the program runs with the test's stdin; the grader compares its stdout with
  `expected_stdout` (trailing whitespace of lines and of the output ignored). The expected output
  never enters the sandbox.
- function test: after the solution's definitions, the harness calls `function(*args)` and writes
  the return value as tagged plain data; the grader compares it with `expected_json` with exact
  types (`1`, `1.0` and `true` differ; a tuple reads as a JSON list). The expected value never enters
  the sandbox, and an object whose `__eq__` is always true is not plain data: refused.
- assert test: the snippet is rewritten before it is sent. `assert a == 3` becomes a call that
  records the value of `a`: the literal `3` stays here, and the comparison is made here, on plain
  data, with exact types. Operands that are not literals (`assert f(1) == f(2) - 1`) are all
  recorded; a bare `assert x` must record exactly `True` (`assert not x`: exactly `False`).

A test passes only from records written after it ran (the function returned; the snippet ran to its
end), carrying this run's random nonce, read from a pipe that is not stdout: printing a forged
record does nothing, and a record with another nonce fails the test. Every test must produce its
own unit result (executed == given) and its own exactly-one final record; exit code 0 alone never
means pass (`sys.exit(0)`, `os._exit(0)`, `raise SystemExit(0)` before the harness ran leave no record).

Not covered: a solution that reads the nonce out of its own memory can write records, but only
values: it cannot learn the expected ones, which are not in the sandbox. Only literal operands of a
comparison stay out: where an assert compares two computed values (e.g. against a reference
implementation shipped in the snippet) or is a call (`assert math.isclose(f(x), 1.5)`: the 1.5 is in
the sent code), the sandbox holds everything needed to forge that record. Floats compare exactly
(Python's `==`), with NaN equal to NaN.
"""

from __future__ import annotations

import ast
import base64
import json
import math
import signal
from dataclasses import dataclass, field
from typing import Any

from offbeat.v1 import sandbox_pb2 as pb

_NO = object()
MAX_RECORDS = 10_000


@dataclass
class AssertPlan:
    kind: str  # "compare" | "true" | "false"
    ops: list[str] = field(default_factory=list)
    literals: list[Any] = field(default_factory=list)  # per operand: the literal, or _NO (recorded)

    @property
    def recorded(self) -> int:
        return sum(1 for lit in self.literals if lit is _NO) if self.kind == "compare" else 1


@dataclass
class TestPlan:
    index: int
    kind: str  # "stdio" | "call" | "assert" | "skip"
    expected: Any = None
    asserts: dict[int, AssertPlan] = field(default_factory=dict)
    message: str = ""


class InvalidRequest(ValueError):
    """The request cannot be run as given (answered SANDBOX_ERROR with the reason)."""


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NO


class _AssertRewriter(ast.NodeTransformer):
    def __init__(self) -> None:
        self.plans: dict[int, AssertPlan] = {}

    def visit_Assert(self, node: ast.Assert) -> ast.stmt:
        k = len(self.plans)
        test = node.test
        sent: list[ast.expr]
        if isinstance(test, ast.Compare):
            operands = [test.left, *test.comparators]
            literals = [_literal(o) for o in operands]
            plan = AssertPlan("compare", [type(op).__name__ for op in test.ops], literals)
            sent = [o for o, lit in zip(operands, literals, strict=True) if lit is _NO]
        elif isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            plan, sent = AssertPlan("false"), [test.operand]
        else:
            plan, sent = AssertPlan("true"), [test]
        self.plans[k] = plan
        call = ast.Call(ast.Name("__offbeat_assert__", ast.Load()), [ast.Constant(k), *sent], [])
        return ast.copy_location(ast.Expr(call), node)


def rewrite_asserts(code: str) -> tuple[str, dict[int, AssertPlan]]:
    """The snippet as sent to the sandbox (literal comparands removed) and the plan per assert."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise InvalidRequest(f"assert_code does not parse: {exc}") from None
    rewriter = _AssertRewriter()
    tree = ast.fix_missing_locations(rewriter.visit(tree))
    return ast.unparse(tree), rewriter.plans


# --- plain data ----------------------------------------------------------------------------------


def decode(x: Any, depth: int = 0) -> Any:
    """Tagged plain data (see `worker_main.encode`) back to Python values; ValueError otherwise."""
    if depth > 64:
        raise ValueError("value nested too deeply")
    if x is None or type(x) in (bool, str):
        return x
    if type(x) is dict and len(x) == 1:
        ((tag, v),) = x.items()
        if tag == "i" and type(v) is str:
            return int(v)
        if tag == "f" and type(v) is str:
            return float(v)
        if tag in ("l", "t", "s") and type(v) is list:
            items = [decode(e, depth + 1) for e in v]
            if tag == "s":
                try:
                    return frozenset(items)
                except TypeError:
                    raise ValueError("unhashable set element") from None
            return items if tag == "l" else tuple(items)
        if tag == "d" and type(v) is list:
            out = {}
            for pair in v:
                if type(pair) is not list or len(pair) != 2:
                    raise ValueError("malformed dict item")
                try:
                    out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
                except TypeError:
                    raise ValueError("unhashable dict key") from None
            return out
        if tag == "b" and type(v) is str:
            return bytes.fromhex(v)
        if tag == "c" and type(v) is list and len(v) == 2:
            return complex(float(v[0]), float(v[1]))
    raise ValueError(f"not tagged plain data: {str(x)[:80]}")


def typed(v: Any, *, json_view: bool = False) -> Any:
    """A hashable form in which values are equal only if their types are exactly equal too."""
    t = type(v)
    if v is None:
        return ("none",)
    if t in (bool, int, str, bytes, complex):
        return (t.__name__, v)
    if t is float:
        return ("float", "nan" if math.isnan(v) else v)
    if t is list or (json_view and t is tuple):
        return ("list", tuple(typed(e, json_view=json_view) for e in v))
    if t is tuple:
        return ("tuple", tuple(typed(e, json_view=json_view) for e in v))
    if t in (set, frozenset):
        return ("set", frozenset(typed(e, json_view=json_view) for e in v))
    if t is dict:
        return (
            "dict",
            frozenset((typed(k, json_view=json_view), typed(x, json_view=json_view)) for k, x in v.items()),
        )
    raise ValueError(f"not plain data: {t.__name__}")


def _compare(op: str, a: Any, b: Any) -> bool:
    if op == "Eq":
        return bool(typed(a) == typed(b))
    if op == "NotEq":
        return bool(typed(a) != typed(b))
    if op in ("Is", "IsNot"):
        if not any(x is None or type(x) is bool for x in (a, b)):
            raise ValueError("`is` is only graded against None, True or False")
        return (a is b) == (op == "Is")
    if op in ("In", "NotIn"):
        if type(b) in (str, bytes):
            if type(a) is not type(b):
                raise ValueError(f"{type(a).__name__} in {type(b).__name__}")
            found = a in b
        elif type(b) in (list, tuple, frozenset, set, dict):
            found = any(typed(a) == typed(e) for e in b)
        else:
            raise ValueError(f"`in` on {type(b).__name__}")
        return found == (op == "In")
    numeric = all(type(x) in (int, float) for x in (a, b))
    if not numeric and (type(a) is not type(b) or type(a) not in (str, bytes, list, tuple)):
        raise ValueError(f"ordering {type(a).__name__} against {type(b).__name__}")
    ops = {"Lt": a < b, "LtE": a <= b, "Gt": a > b, "GtE": a >= b} if op in ("Lt", "LtE", "Gt", "GtE") else {}
    if op not in ops:
        raise ValueError(f"operator {op} is not graded")
    return bool(ops[op])


def check_assert(plan: AssertPlan, recorded: list[Any]) -> tuple[bool, str]:
    if len(recorded) != plan.recorded:
        return False, f"assert recorded {len(recorded)} values, expected {plan.recorded}"
    if plan.kind != "compare":
        want = plan.kind == "true"
        v = recorded[0]
        ok = type(v) is bool and v is want
        return ok, "" if ok else f"assert expected exactly {want}, got {type(v).__name__} {str(v)[:200]}"
    values = iter(recorded)
    operands = [next(values) if lit is _NO else lit for lit in plan.literals]
    for op, a, b in zip(plan.ops, operands, operands[1:], strict=False):
        try:
            ok = _compare(op, a, b)
        except (ValueError, TypeError) as exc:
            return False, f"assert not gradable: {exc}"
        if not ok:
            return False, f"assert failed: {str(a)[:200]} {op} {str(b)[:200]}"
    return True, ""


def normalize_stdout(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    return "\n".join(line.rstrip() for line in text.rstrip().split("\n"))


# --- building the job ----------------------------------------------------------------------------


def test_units(tests: list[pb.TestCase], language: str) -> tuple[list[dict[str, Any]], list[TestPlan]]:
    """One unit per test (what the sandbox gets) and one plan per test (what stays here)."""
    units: list[dict[str, Any]] = []
    plans: list[TestPlan] = []
    for i, t in enumerate(tests):
        if t.function and t.assert_code:
            raise InvalidRequest(f"test {i}: both function and assert_code set")
        if t.function:
            try:
                args = json.loads(t.args_json or "[]")
                expected = json.loads(t.expected_json)
            except ValueError as exc:
                raise InvalidRequest(f"test {i}: args_json/expected_json is not JSON: {exc}") from None
            if type(args) is not list:
                raise InvalidRequest(f"test {i}: args_json must be a JSON list")
            plan = TestPlan(i, "call", expected=expected)
            unit = {"kind": "call", "function": t.function, "args_json": t.args_json or "[]"}
        elif t.assert_code:
            code, asserts = rewrite_asserts(t.assert_code)
            plan = TestPlan(i, "assert", asserts=asserts)
            unit = {"kind": "assert", "code": code}
        else:
            plan = TestPlan(i, "stdio", expected=bytes(t.expected_stdout))
            unit = {"kind": "run"}
        if language == "bash" and plan.kind != "stdio":
            plan = TestPlan(i, "skip", message="function and assert tests need python")
        else:
            units.append({**unit, "stdin": bytes(t.stdin), "test": i})
        plans.append(plan)
    return units, plans


# --- results -------------------------------------------------------------------------------------


def unit_status(unit: dict[str, Any], limits: dict[str, Any]) -> int:
    sig = int(unit.get("signal") or 0)
    if unit.get("output_limit"):
        return pb.EXEC_STATUS_OUTPUT_LIMIT
    if unit.get("oom"):
        return pb.EXEC_STATUS_MEMORY_LIMIT
    if unit.get("timeout"):
        return pb.EXEC_STATUS_TIMEOUT
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and float(unit.get("cpu", 0)) >= limits["cpu"] - 0.05):
        return pb.EXEC_STATUS_TIMEOUT
    if unit.get("exit") == 0 and sig == 0:
        return pb.EXEC_STATUS_OK
    tail = unit_bytes(unit, "stderr")[-4096:]
    if (
        b"MemoryError" in tail
        or b"annot allocate memory" in tail
        or b"out of memory" in tail
        or (
            sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGKILL)
            and unit.get("maxrss", 0) >= 0.9 * limits["mem"]
        )
    ):
        return pb.EXEC_STATUS_MEMORY_LIMIT
    return pb.EXEC_STATUS_RUNTIME_ERROR


def unit_bytes(unit: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(unit.get(key) or "")


def _records(unit: dict[str, Any], nonce: str, index: int) -> tuple[list[dict[str, Any]], str]:
    if unit.get("rec_trunc"):
        return [], "test records over the output limit"
    out = []
    for line in unit_bytes(unit, "records").splitlines()[:MAX_RECORDS]:
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # the run writes these lines: nested 5,000 deep, say
            return [], "malformed test record"
        if type(rec) is not dict or rec.get("n") != nonce:
            return [], "forged test record (wrong nonce)"
        if rec.get("i") != index:
            return [], "test record of another test"
        out.append(rec)
    return out, ""


def grade_test(plan: TestPlan, unit: dict[str, Any], nonce: str, limits: dict[str, Any]) -> pb.TestResult:
    """Pass or fail one test from its unit's outcome and records (never from an exit code alone)."""
    status = unit_status(unit, limits)
    result = pb.TestResult(index=plan.index, status=status, wall_s=float(unit.get("wall", 0.0)))  # type: ignore[arg-type]
    if plan.kind == "stdio":
        if status != pb.EXEC_STATUS_OK:
            result.message = f"exit {unit.get('exit')}, signal {unit.get('signal')}"
        elif normalize_stdout(unit_bytes(unit, "stdout")) != normalize_stdout(plan.expected):
            result.message = "stdout differs from expected_stdout"
        else:
            result.passed = True
        return result
    records, problem = _records(unit, nonce, plan.index)
    errors = [r["e"] for r in records if "e" in r]
    if problem or errors:
        result.message = problem or str(errors[0])[:2000]
        return result
    if plan.kind == "call":
        values = [r for r in records if "v" in r]
        if len(values) != 1 or len(records) != 1:
            result.message = "no result record: the call did not return" if not values else "extra records"
            return result
        try:
            got = decode(values[0]["v"])
            ok = typed(got, json_view=True) == typed(plan.expected, json_view=True)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            result.message = f"returned value not gradable: {exc}"
            return result
        result.message = "" if ok else f"returned {str(got)[:200]}, expected {str(plan.expected)[:200]}"
    else:
        done = [r for r in records if r.get("done") is True]
        if len(done) != 1 or records[-1].get("done") is not True:
            result.message = "no completion record: the snippet did not run to its end"
            return result
        checks = [r for r in records if "a" in r]
        if plan.asserts and not checks:
            result.message = "no assert ran"
            return result
        if len(checks) != len(records) - 1:
            result.message = "unexpected records"
            return result
        # the completion record proves only that the snippet's end was reported, and the run can
        # report it (it can read the nonce off the harness's stack): every assert must have run
        ran = {rec["a"] for rec in checks if type(rec["a"]) is int}
        skipped = sorted(set(plan.asserts) - ran)
        if skipped:
            result.message = f"assert {skipped[0]} never ran (every assert of a test must run)"
            return result
        ok = True
        for rec in checks:
            assert_plan = plan.asserts.get(rec["a"]) if type(rec["a"]) is int else None
            if assert_plan is None or type(rec.get("v")) is not list:
                ok, result.message = False, "record of an unknown assert"
                break
            try:
                values = [decode(v) for v in rec["v"]]
            except (ValueError, TypeError, OverflowError, RecursionError) as exc:
                ok, result.message = False, f"assert operand not gradable: {exc}"
                break
            ok, result.message = check_assert(assert_plan, values)
            if not ok:
                break
    result.passed = ok and status == pb.EXEC_STATUS_OK
    if ok and not result.passed:
        result.message = f"exit {unit.get('exit')}, signal {unit.get('signal')}"
    return result
