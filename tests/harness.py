"""A live run for the chaos, overload and fuzz suites: `offbeat run` as a user starts it, its
service processes, and an audit of every trajectory's fate once it has stopped.

`LiveRun` starts the launcher as a child process (its services are the launcher's children) on
servers the test owns, so a test may kill services and restart the servers under it. `audit`
reads the ledger, the run's JetStream stream and the trainer's newest checkpoint afterwards and
sorts every requested trajectory into exactly one bucket: a terminal status (by reason), in flight
at stop (with a message still in the stream that carries it on: a `--resume` would continue it),
or lost. It also counts trajectories trained twice.

Not covered: starting the servers (the tests do, with `offbeat.infra`) or judging the counts (the
tests assert on them).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg

BIN = Path(sys.executable).parent
SERVICES = ("sandbox", "inference", "scorer", "trainer", "orchestrator")
ENVPKG = Path(__file__).parent / "envpkg"
ADMIN_TOKEN = "suite-token"
PIP_INSTALL = (sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation")


def install_envpkg(target: Path) -> Path:
    """pip-install tests/envpkg (the test environments, through their entry points) into `target`;
    the services find them with `target` on their PYTHONPATH (`LiveRun(pythonpath=...)`)."""
    source = target.parent / "envpkg-src"
    shutil.copytree(ENVPKG, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    out = subprocess.run(
        [*PIP_INSTALL, "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return target


def write_config(
    tmp: Path,
    run_id: str,
    *,
    max_steps: int,
    max_staleness: int = 1,
    envs: str = 'name = "sandbox_echo"\nargs = { size = 50 }',
    sections: str = "",
) -> Path:
    """A tiny run: 4 samples per group, 2 groups per step, 4-token completions, a tiny model."""
    path = tmp / "run.toml"
    path.write_text(f"""
[run]
id = "{run_id}"
state_dir = "{tmp / "state"}"
max_staleness = {max_staleness}
group_size = 4
groups_per_step = 2
max_steps = {max_steps}

[bus]
stream_max_bytes = 268435456

[model]
max_model_len = 128

[[envs]]
{envs}

[launcher]
tiny_model = {{ hidden_size = 64, layers = 2, heads = 4, kv_heads = 2 }}
progress_interval_s = 1.0
final_eval_timeout_s = 30

[orchestrator]
admin_port = 0
eval_every = 4
eval_examples = 4
sampling = {{ temperature = 1.0, max_tokens = 4 }}

[inference]
max_batch = 32

[trainer]
lr = 1e-3
{sections}
""")
    return path


def query(dsn: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn.replace("postgresql+asyncpg", "postgresql"), connect_timeout=5) as conn:
        return list(conn.execute(sql, args).fetchall())  # type: ignore[arg-type]


class LiveRun:
    """`offbeat run CONFIG` on the given servers; output goes to a file (a pipe could fill up)."""

    def __init__(
        self,
        config: Path,
        *,
        run_id: str,
        nats_url: str,
        database_url: str,
        pythonpath: Path | None = None,
        sets: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.run_id = run_id
        self.nats_url = nats_url
        self.dsn = database_url
        self.log_path = config.parent / "offbeat-run.log"
        self.run_dir = config.parent / "state" / "runs" / run_id
        env = {**os.environ, "OFFBEAT_ADMIN_TOKEN": ADMIN_TOKEN}
        if pythonpath is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH")) if p)
        argv = [str(BIN / "offbeat"), "run", str(config), "--nats-url", nats_url]
        argv += ["--database-url", database_url, "--no-progress", "--no-report"]
        for item in sets:
            argv += ["--set", item]
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.started = time.monotonic()

    # --- the processes ----------------------------------------------------------------------

    def services(self) -> dict[str, psutil.Process]:
        """The launcher's live service processes by name (`scorer`, ...; replicas get `-1`, ...)."""
        found: dict[str, psutil.Process] = {}
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return found
        for child in children:
            try:
                args = child.cmdline()[:2]
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            for service in SERVICES:
                if any(Path(a).name == f"offbeat-{service}" for a in args):
                    name = service if service not in found else f"{service}-{len(found)}"
                    found[name] = child
        return found

    def pid(self, service: str) -> int | None:
        proc = self.services().get(service)
        return proc.pid if proc is not None else None

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.services().items()}

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of each service process (its own, not its children's), in MiB."""
        out = {}
        for name, proc in self.services().items():
            try:
                out[name] = proc.memory_info().rss / 2**20
            except psutil.Error:
                continue
        return out

    # --- waiting ----------------------------------------------------------------------------

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def restarts(self) -> list[str]:
        """The launcher's `<service> exited <code>; restarting` lines so far."""
        return [line for line in self.output().splitlines() if "; restarting (" in line]

    def wait(self, predicate: Callable[[], Any], *, timeout_s: float, what: str) -> Any:
        """Poll until `predicate()` is truthy; fail at once (with the launcher's output) if it exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = predicate()
            except psycopg.OperationalError:  # the database may be restarting under the test
                value = None
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"offbeat run exited {self.proc.returncode} while waiting for {what}:\n{self.output()[-6000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s:.0f}s waiting for {what}:\n{self.output()[-6000:]}"
                )
            time.sleep(0.5)

    def step(self) -> int:
        rows = query(
            self.dsn,
            "SELECT max(step) FROM trainer_steps WHERE run_id=%s AND NOT rolled_back",
            self.run_id,
        )
        return int(rows[0][0] or 0)

    def scored_ok_since(self, since: float) -> int:
        """Trajectories scored `ok` (their rubric ran, the sandbox answered) after `since` (unix time)."""
        rows = query(
            self.dsn,
            "SELECT count(*) FROM trajectories WHERE run_id=%s AND reward_status='ok' "
            "AND scored_at > to_timestamp(%s)",
            self.run_id,
            since,
        )
        return int(rows[0][0])

    def finish(self, *, timeout_s: float) -> int:
        """Wait for the launcher to exit by itself (it stops the services at max_steps)."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"offbeat run did not finish within {timeout_s:.0f}s:\n{self.output()[-6000:]}"
            ) from None

    def stop(self) -> None:
        """Ctrl-C: the launcher stops its services; killed if it takes too long."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                for child in self.services().values():
                    child.kill()
                self.proc.kill()
                self.proc.wait()


# --- the audit --------------------------------------------------------------------------------


@dataclass
class Audit:
    """Every trajectory of a stopped run, each in exactly one bucket."""

    requested: int = 0
    """Trajectory ids named by the orchestrator's rollout requests (the ledger's rows with a
    request, and requests still in the stream that the ledger had not recorded yet)."""
    eval_requested: int = 0
    """Of those, eval trajectories (never trained; terminal status `evaluated`)."""
    terminal: dict[str, int] = field(default_factory=dict)
    """status -> count over the terminal statuses."""
    discarded: dict[str, int] = field(default_factory=dict)
    """`status: reason` -> count, for every terminal status but `trained` and `evaluated`."""
    in_flight_at_stop: dict[str, int] = field(default_factory=dict)
    """Ledger status (or `unrecorded`) -> count of trajectories not terminal when the run stopped
    whose request, completion, score or step report is still in the stream, unacknowledged."""
    lost: list[str] = field(default_factory=list)
    """Requested, not terminal, and nothing in the stream carries them on."""
    duplicated: list[str] = field(default_factory=list)
    """Ids trained more than once (the trainer's accounting, or step reports vs the ledger)."""
    unrequested: list[str] = field(default_factory=list)
    """Ledger rows no request named (e.g. a forged completion)."""
    trained_not_in_checkpoint: list[str] = field(default_factory=list)
    checkpoint_not_trained: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    step_consumed_total: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    """consumer -> dead letters recorded in the ledger."""
    details: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    """Ledger rows (id, status, reason, request, requested/generated/scored/finished at) of the
    lost and unrequested trajectories, for failure messages."""

    @property
    def trained(self) -> int:
        return self.terminal.get("trained", 0)

    def counts(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "eval_requested": self.eval_requested,
            "trained": self.trained,
            "evaluated": self.terminal.get("evaluated", 0),
            "discarded_by_reason": dict(sorted(self.discarded.items())),
            "in_flight_at_stop": dict(sorted(self.in_flight_at_stop.items())),
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "steps": len(self.steps),
            "dead_letters": self.dead_letters,
        }

    def check_balanced(self) -> None:
        """requested == terminal + in flight at stop + lost, and nothing lost or trained twice."""
        in_flight = sum(self.in_flight_at_stop.values())
        assert self.requested == sum(self.terminal.values()) + in_flight + len(self.lost), self.counts()
        assert not self.lost, (
            f"lost trajectories ({len(self.lost)}): {self.details.get('lost', [])[:10]}; in the trainer's "
            f"checkpoint: {self.details.get('lost_in_checkpoint')}; {self.counts()}"
        )
        assert not self.duplicated, f"trained twice: {self.duplicated[:10]}; {self.counts()}"
        assert not self.trained_not_in_checkpoint and not self.checkpoint_not_trained, (
            f"ledger and trainer disagree on what was trained: in the ledger only "
            f"{self.trained_not_in_checkpoint[:5]}, in the checkpoint only {self.checkpoint_not_trained[:5]}"
        )
        assert self.step_consumed_total == self.trained, (
            f"step reports consumed {self.step_consumed_total}, the ledger has {self.trained} trained"
        )


def _reason(status: str, reason: str | None) -> str:
    reason = (reason or "").strip()
    if reason.startswith("dead letter from "):  # keep the consumer and the error's kind, not its text
        reason = reason.split(":", 2)[0] + ": " + reason.split(":", 2)[1].strip()[:40]
    return f"{status}: {reason[:80]}" if reason else status


async def stream_ids(nats_url: str, run_id: str, prefix: str = "offbeat") -> tuple[set[str], set[str]]:
    """(ids named by requests still in the run's stream, ids named by any message still in it)."""
    import nats
    import nats.js.errors
    from offbeat_orchestrator.events import dead_letter_trajectories

    from offbeat.bus import Subjects
    from offbeat.v1 import policy_pb2, rollout_pb2

    subjects = Subjects(prefix, run_id)
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=2)
    requested: set[str] = set()
    named: set[str] = set()
    try:
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(subjects.stream)
        seq, last = info.state.first_seq, info.state.last_seq
        while info.state.messages and seq <= last:
            try:
                # the first message at or after seq (acknowledged ones leave gaps)
                msg = await js.get_msg(subjects.stream, seq=seq, subject=subjects.all, next=True)
            except nats.js.errors.NotFoundError:
                break
            seq = int(msg.seq or seq) + 1
            kind = subjects.kind(msg.subject or "")
            data = msg.data or b""
            try:
                if kind == "rollout.request":
                    ids = list(rollout_pb2.RolloutRequest.FromString(data).trajectory_ids)
                    requested.update(ids)
                    named.update(ids)
                elif kind == "rollout.completion":
                    named.add(rollout_pb2.RolloutCompletion.FromString(data).trajectory_id)
                elif kind == "rollout.scored":
                    named.add(rollout_pb2.ScoredTrajectory.FromString(data).completion.trajectory_id)
                elif kind == "trainer.step":
                    step = policy_pb2.TrainerStep.FromString(data)
                    named.update(step.consumed_trajectory_ids)
                    named.update(d.trajectory_id for d in step.dropped)
                elif kind == "dlq":
                    letter = policy_pb2.DeadLetter.FromString(data)
                    named.update(dead_letter_trajectories(letter, subjects.kind(letter.subject)))
            except Exception:  # a malformed message (the fuzz suite publishes them) names nothing
                continue
    finally:
        await nc.close()
    return requested, named


def trainer_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The trainer's newest checkpoint state with its accounting: its own record of what it trained."""
    from offbeat_trainer.checkpoint import read_state

    names = sorted((run_dir / "trainer").glob("ckpt-*/state.json"))
    assert names, f"no trainer checkpoint under {run_dir / 'trainer'}"
    return json.loads(read_state(names[-1].parent).to_json())  # type: ignore[no-any-return]


def audit(run: LiveRun) -> Audit:
    """Sort every trajectory of the stopped run into one bucket (see `Audit`)."""
    from offbeat.ledger.models import TERMINAL

    rows = query(
        run.dsn,
        "SELECT trajectory_id, status, reason, eval, requested_at IS NOT NULL FROM trajectories WHERE run_id=%s",
        run.run_id,
    )
    in_stream_requests, in_stream = asyncio.run(stream_ids(run.nats_url, run.run_id))
    a = Audit()
    ledger_ids = set()
    terminal: Counter[str] = Counter()
    discarded: Counter[str] = Counter()
    in_flight: Counter[str] = Counter()
    for tid, status, reason, is_eval, requested in rows:
        ledger_ids.add(tid)
        if not requested and tid not in in_stream_requests:
            a.unrequested.append(tid)
            continue
        a.requested += 1
        a.eval_requested += bool(is_eval)
        if status in TERMINAL:
            terminal[status] += 1
            if status not in ("trained", "evaluated"):
                discarded[_reason(status, reason)] += 1
        elif tid in in_stream:
            in_flight[status] += 1
        else:
            a.lost.append(tid)
    unrecorded = in_stream_requests - ledger_ids
    a.requested += len(unrecorded)
    if unrecorded:
        in_flight["unrecorded"] = len(unrecorded)
    a.terminal, a.discarded, a.in_flight_at_stop = dict(terminal), dict(discarded), dict(in_flight)
    for name, ids in (("lost", a.lost), ("unrequested", a.unrequested)):
        if ids:
            a.details[name] = query(
                run.dsn,
                "SELECT trajectory_id, status, reason, request_id, requested_at, generated_at, scored_at, "
                "finished_at FROM trajectories WHERE run_id=%s AND trajectory_id = ANY(%s) ORDER BY 1",
                run.run_id,
                ids[:20],
            )
    trained = {
        tid
        for (tid,) in query(
            run.dsn, "SELECT trajectory_id FROM trajectories WHERE run_id=%s AND status='trained'", run.run_id
        )
    }
    state = trainer_checkpoint(run.run_dir)
    consumed = Counter(state["consumed"])
    if a.lost:  # what the trainer's own accounting says of them
        dropped, retired = state["dropped"], set(state["retired"])
        a.details["lost_in_checkpoint"] = [
            (tid, "consumed" if tid in consumed else dropped.get(tid, "retired" if tid in retired else "-"))
            for tid in a.lost[:20]
        ]
    a.duplicated = sorted(tid for tid, n in consumed.items() if n > 1)
    a.trained_not_in_checkpoint = sorted(trained - set(consumed))
    # consumed by the last step but its report not yet in the ledger is in flight, not a disagreement
    a.checkpoint_not_trained = sorted(set(consumed) - trained - in_stream)
    steps = query(
        run.dsn,
        "SELECT step, consumed FROM trainer_steps WHERE run_id=%s AND NOT rolled_back ORDER BY step",
        run.run_id,
    )
    a.steps = [int(s) for s, _ in steps]
    a.step_consumed_total = sum(int(c) for _, c in steps)
    a.dead_letters = {
        str(c): int(n)
        for c, n in query(
            run.dsn, "SELECT consumer, count(*) FROM dead_letters WHERE run_id=%s GROUP BY 1", run.run_id
        )
    }
    return a
