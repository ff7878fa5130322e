"""`make bench`: run every bench/*.py, collect the JSON each prints last, judge it against its goal.

Writes bench/results.json (all figures) and bench/results.md (figure, goal, measured, pass/fail).
A benchmark that fails to run is reported as such; the others still run.
"""

from __future__ import annotations

import json
import operator
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
# (bench, figure, comparison, goal)
GOALS: list[tuple[str, str, str, float]] = [
    ("bus", "ratio", ">=", 0.8),
    ("sandbox", "p50_ms", "<=", 5.0),
    ("sandbox", "speedup_vs_cold", ">=", 3.0),
    ("sandbox", "runs_per_s", ">=", 200.0),
    ("inference", "service_ratio", ">=", 0.9),
    ("inference", "cb_speedup", ">=", 1.5),
    ("inference", "apply_ratio", "<=", 2.0),
    ("scorer", "reasoning_gym_ratio", ">=", 0.8),
    ("trainer", "ratio", ">=", 0.9),
    ("ledger", "ratio", ">=", 0.8),
    ("ledger", "writer_events_per_s", ">=", 5000.0),
    ("weights", "tiny_file_ratio", "<=", 2.0),
    ("weights", "tiny_nats_ratio", "<=", 2.0),
    ("weights", "qwen05b_file_ratio", "<=", 2.0),
    ("weights", "qwen05b_nats_ratio", "<=", 2.0),
    ("async_speedup", "k2_vs_ideal", ">=", 0.85),
    ("async_speedup", "eval_gap_vs_noise", "<=", 1.0),
]
OPS = {">=": operator.ge, "<=": operator.le}


def run_one(path: Path, timeout_s: float) -> dict[str, object]:
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f}s"}
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    try:
        figures = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"last line is not JSON: {lines[-1][:200]}"}
    figures["_seconds"] = round(time.monotonic() - started, 1)
    return figures


def main() -> None:
    only = set(sys.argv[1:])
    results: dict[str, dict[str, object]] = {}
    for path in sorted(HERE.glob("*.py")):
        if path.name == Path(__file__).name or (only and path.stem not in only):
            continue
        print(f"running {path.name} ...", flush=True)
        results[path.stem] = run_one(path, timeout_s=1800)
        print(f"  {json.dumps(results[path.stem])}", flush=True)
    rows = ["| bench | figure | goal | measured | pass |", "|---|---|---|---|---|"]
    for bench, figure, op, goal in GOALS:
        if bench not in results:
            continue
        value = results[bench].get(figure)
        if isinstance(value, int | float):
            ok = "pass" if OPS[op](value, goal) else "FAIL"
            rows.append(f"| {bench} | {figure} | {op} {goal:g} | {value:g} | {ok} |")
        else:
            rows.append(
                f"| {bench} | {figure} | {op} {goal:g} | {results[bench].get('error', 'missing')} | FAIL |"
            )
    (HERE / "results.json").write_text(json.dumps(results, indent=2))
    (HERE / "results.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
