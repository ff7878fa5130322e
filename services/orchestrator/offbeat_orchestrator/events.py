"""Pure mapping from bus events to ledger rows (and to the one-line summaries WatchEvents shows).

Every function here takes a decoded protobuf message and returns plain dicts shaped like the
ledger's tables; nothing touches the database or the bus, so the same mapping serves the ledger
writer, its tests and `bench/ledger.py`. Rows are merged by `Ledger.upsert_trajectories`, so each
function only fills the columns its event knows.

An event must name the run whose ledger it goes to: one that names another run, or none (an
empty `run_id`), has no rows; `to_rows` raises `Reject` (the bus dead-letters it with the reason).
Dead letters name no run (their subject does).

Not covered: batching, acks and commit order (that is `ledger_writer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from google.protobuf.message import DecodeError, Message

from offbeat.bus import Reject
from offbeat.ids import storable_id
from offbeat.v1 import policy_pb2, rollout_pb2

MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    "rollout.request": rollout_pb2.RolloutRequest,
    "rollout.completion": rollout_pb2.RolloutCompletion,
    "rollout.scored": rollout_pb2.ScoredTrajectory,
    "policy.weights": policy_pb2.WeightVersion,
    "policy.live": policy_pb2.PolicyLive,
    "trainer.step": policy_pb2.TrainerStep,
    "control": policy_pb2.ControlCommand,
    "dlq": policy_pb2.DeadLetter,
}

DROP_STATUS: Final = {"stale": "discarded_stale", "rolled_back": "discarded_rolled_back"}


def ts(unix: float | None) -> datetime | None:
    """A timestamp read off the bus as a datetime; None when it is not one (NaN, out of range), so
    a corrupt time field costs that field, never the event (`fromtimestamp` raises on those)."""
    if not unix:
        return None
    try:
        return datetime.fromtimestamp(unix, tz=UTC)
    except (ValueError, OverflowError, OSError):
        return None


def event_kind(kind: str) -> str:
    """`control.pause` -> `control`; other kinds unchanged."""
    return "control" if kind.startswith("control.") else kind


def decode(kind: str, data: bytes) -> Message:
    """Parse a payload by its subject kind; raises DecodeError for an unknown kind or bad bytes."""
    message_type = MESSAGE_TYPES.get(event_kind(kind))
    if message_type is None:
        raise DecodeError(f"no message type for subject kind {kind!r}")
    return message_type.FromString(data)


def reward_status_name(value: int) -> str:
    """`ok`, `parse_error`, ...; `unknown:<n>` for a value the enum does not define (proto3 enums
    are open: a message may carry any number)."""
    try:
        name = rollout_pb2.RewardStatus.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return f"unknown:{value}"
    return name.removeprefix("REWARD_STATUS_").lower()


@dataclass
class Rows:
    """Ledger rows produced by one or more events, grouped by table."""

    trajectories: list[dict[str, Any]] = field(default_factory=list)
    policy_versions: list[dict[str, Any]] = field(default_factory=list)
    live: dict[int, datetime] = field(default_factory=dict)
    """version -> earliest time a replica reported serving it."""
    trainer_steps: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    eval_versions: set[int] = field(default_factory=set)
    """Versions whose eval reward must be recomputed (an eval trajectory of theirs was scored)."""

    def extend(self, other: Rows) -> None:
        self.trajectories.extend(other.trajectories)
        self.policy_versions.extend(other.policy_versions)
        for v, at in other.live.items():
            self.live[v] = min(at, self.live.get(v, at))
        self.trainer_steps.extend(other.trainer_steps)
        self.dead_letters.extend(other.dead_letters)
        self.eval_versions |= other.eval_versions

    def __len__(self) -> int:
        return (
            len(self.trajectories)
            + len(self.policy_versions)
            + len(self.live)
            + len(self.trainer_steps)
            + len(self.dead_letters)
        )


def request_rows(run_id: str, r: rollout_pb2.RolloutRequest) -> Rows:
    at = ts(r.created_at)
    return Rows(
        trajectories=[
            {
                "run_id": run_id,
                "trajectory_id": tid,
                "group_id": r.group_id,
                "request_id": r.request_id,
                "env": r.env,
                "prompt_key": r.prompt_key,
                "sample_index": i,
                "eval": r.eval,
                "status": "requested",
                "requested_at": at,
            }
            for i, tid in enumerate(r.trajectory_ids)
        ]
    )


def completion_row(run_id: str, c: rollout_pb2.RolloutCompletion, *, status: str) -> dict[str, Any]:
    spans = c.version_spans
    first: int | None
    last: int | None
    if len(spans) == 1:  # the common case, without iterating the repeated field
        first = last = spans[0].version
    elif spans:
        versions = [s.version for s in spans]
        first, last = min(versions), max(versions)
    else:
        first = last = None
    return {
        "run_id": run_id,
        "trajectory_id": c.trajectory_id,
        "group_id": c.group_id or None,
        "request_id": c.request_id or None,
        "env": c.env or None,
        "prompt_key": c.prompt_key or None,
        "sample_index": c.sample_index,
        "eval": c.eval,
        "status": status,
        "prompt_tokens": len(c.prompt_token_ids),
        "completion_tokens": len(c.completion_token_ids),
        "first_version": first,
        "last_version": last,
        "generated_at": ts(c.finished_at),
    }


def completion_rows(run_id: str, c: rollout_pb2.RolloutCompletion) -> Rows:
    return Rows(trajectories=[completion_row(run_id, c, status="generated")])


def scored_row(run_id: str, s: rollout_pb2.ScoredTrajectory) -> dict[str, Any]:
    c = s.completion
    row = completion_row(run_id, c, status="evaluated" if c.eval else "scored")
    row["reward"] = s.reward
    row["reward_status"] = reward_status_name(s.status)
    row["scored_at"] = ts(s.scored_at)
    row["reason"] = s.status_reason or None
    if c.eval:
        row["finished_at"] = row["scored_at"]
    return row


def scored_rows(run_id: str, s: rollout_pb2.ScoredTrajectory) -> Rows:
    row = scored_row(run_id, s)
    rows = Rows(trajectories=[row])
    if row["eval"] and row["first_version"] is not None:
        rows.eval_versions.add(row["first_version"])
    return rows


def step_rows(run_id: str, st: policy_pb2.TrainerStep) -> Rows:
    done = ts(st.finished_at) or datetime.now(UTC)
    trajectories = [
        {
            "run_id": run_id,
            "trajectory_id": tid,
            "status": "trained",
            "consumed_step": st.step,
            "staleness": st.staleness[tid] if tid in st.staleness else None,
            "advantage": st.advantages[tid] if tid in st.advantages else None,
            "finished_at": done,
        }
        for tid in st.consumed_trajectory_ids
        if storable_id(tid)  # a hostile id in a report must not cost the whole step its accounting
    ]
    trajectories += [
        {
            "run_id": run_id,
            "trajectory_id": d.trajectory_id,
            "status": DROP_STATUS.get(d.reason, "failed"),
            "reason": d.reason or "dropped",
            "staleness": d.staleness,
            "finished_at": done,
        }
        for d in st.dropped
        if storable_id(d.trajectory_id)
    ]
    step = {
        "run_id": run_id,
        "step": st.step,
        "version": st.version,
        "consumed": len(st.consumed_trajectory_ids),
        "dropped": len(st.dropped),
        "metrics": dict(st.metrics),
        "started_at": ts(st.started_at),
        "finished_at": ts(st.finished_at),
    }
    return Rows(trajectories=trajectories, trainer_steps=[step])


def weights_rows(run_id: str, w: policy_pb2.WeightVersion) -> Rows:
    return Rows(
        policy_versions=[
            {
                "run_id": run_id,
                "version": w.version,
                "step": w.step,
                "parent": w.parent,
                "uri": w.uri,
                "sha256": w.sha256,
            }
        ]
    )


def live_rows(run_id: str, live: policy_pb2.PolicyLive) -> Rows:
    if not live.ok:
        return Rows()
    return Rows(live={live.version: ts(live.live_at) or datetime.now(UTC)})


def dead_letter_trajectories(letter: policy_pb2.DeadLetter, kind: str) -> list[str]:
    """Trajectory ids named by a dead-lettered payload, or [] if it is not one that parses."""
    try:
        if kind == "rollout.request":
            return list(rollout_pb2.RolloutRequest.FromString(letter.payload).trajectory_ids)
        if kind == "rollout.completion":
            tid = rollout_pb2.RolloutCompletion.FromString(letter.payload).trajectory_id
            return [tid] if tid else []
        if kind == "rollout.scored":
            tid = rollout_pb2.ScoredTrajectory.FromString(letter.payload).completion.trajectory_id
            return [tid] if tid else []
    except DecodeError:
        return []
    return []


def dead_letter_rows(run_id: str, letter: policy_pb2.DeadLetter, *, key: str, letter_kind: str) -> Rows:
    """The dead letter's row, and `failed` for the samples its payload names (unless the ledger
    itself refused it). `letter_kind` is the subject kind of the dead message (`rollout.completion`)."""
    at = ts(letter.dead_at) or datetime.now(UTC)
    reason = f"dead letter from {letter.consumer or '?'}: {letter.reason}"
    return Rows(
        dead_letters=[
            {
                "run_id": run_id,
                "key": key[:128],
                "subject": letter.subject,
                "consumer": letter.consumer,
                "reason": letter.reason,
                "deliveries": letter.deliveries,
                "payload_bytes": len(letter.payload),
                "at": at,
            }
        ],
        trajectories=[
            {"run_id": run_id, "trajectory_id": tid, "status": "failed", "reason": reason, "finished_at": at}
            for tid in dead_letter_trajectories(letter, letter_kind)
            # the ledger's own refusals say nothing of the sample's fate; an id the ledger cannot
            # hold was never recorded
            if letter.consumer != "ledger" and storable_id(tid)
        ],
    )


def named_run(message: Message) -> str | None:
    """The run an event names (`''` when it names none); None for a dead letter, which has no run id."""
    m: Any = message
    if isinstance(m, rollout_pb2.ScoredTrajectory):
        return str(m.completion.run_id)
    return str(m.run_id) if hasattr(m, "run_id") else None


def to_rows(
    run_id: str, kind: str, message: Message, *, key: str = "", root: str = "", into: Rows | None = None
) -> Rows:
    """The ledger rows of one event. `key` names a dead letter; `root` is the run's subject root
    (`<prefix>.<run>`), used to find the kind of a dead-lettered message's subject. With `into`,
    the rows are added to it and it is returned (the ledger writer's batch: completions and scores
    then cost one row dict each, no `Rows` of their own). Raises `Reject` for an event that names
    another run or none."""
    kind = event_kind(kind)
    named = named_run(message)
    if named is not None and named != run_id:
        raise Reject(f"{kind} event names run {named!r}, expected {run_id!r}")
    if into is not None and kind == "rollout.completion":
        into.trajectories.append(completion_row(run_id, message, status="generated"))  # type: ignore[arg-type]
        return into
    if kind == "rollout.scored" and message.status == rollout_pb2.REWARD_STATUS_LOST:  # type: ignore[attr-defined]
        return Rows() if into is None else into  # the scheduler's notice: the sample is `failed` already
    if into is not None and kind == "rollout.scored":
        row = scored_row(run_id, message)  # type: ignore[arg-type]
        into.trajectories.append(row)
        if row["eval"] and row["first_version"] is not None:
            into.eval_versions.add(row["first_version"])
        return into
    rows = _rows(run_id, kind, message, key=key, root=root)
    if into is None:
        return rows
    into.extend(rows)
    return into


def _rows(run_id: str, kind: str, message: Message, *, key: str, root: str) -> Rows:
    if kind == "rollout.request":
        return request_rows(run_id, message)  # type: ignore[arg-type]
    if kind == "rollout.completion":
        return completion_rows(run_id, message)  # type: ignore[arg-type]
    if kind == "rollout.scored":
        return scored_rows(run_id, message)  # type: ignore[arg-type]
    if kind == "trainer.step":
        return step_rows(run_id, message)  # type: ignore[arg-type]
    if kind == "policy.weights":
        return weights_rows(run_id, message)  # type: ignore[arg-type]
    if kind == "policy.live":
        return live_rows(run_id, message)  # type: ignore[arg-type]
    if kind == "dlq":
        letter: policy_pb2.DeadLetter = message  # type: ignore[assignment]
        letter_kind = letter.subject.removeprefix(root + ".") if root else letter.subject
        return dead_letter_rows(run_id, letter, key=key, letter_kind=letter_kind)
    return Rows()  # control commands leave no row: the admin API audits its own calls


def summarize(kind: str, message: Message) -> tuple[str, dict[str, str]]:
    """A one-line summary and a few fields of an event, for WatchEvents."""
    kind = event_kind(kind)
    m: Any = message
    if kind == "rollout.request":
        return f"request {m.request_id} ({m.env}, n={m.n}, attempt {m.attempt})", {
            "request_id": m.request_id,
            "group_id": m.group_id,
            "env": m.env,
            "eval": str(m.eval).lower(),
        }
    if kind == "rollout.completion":
        return f"completion {m.trajectory_id} ({len(m.completion_token_ids)} tokens)", {
            "trajectory_id": m.trajectory_id,
            "group_id": m.group_id,
        }
    if kind == "rollout.scored":
        c = m.completion
        return f"scored {c.trajectory_id}: {m.reward:g} ({reward_status_name(m.status)})", {
            "trajectory_id": c.trajectory_id,
            "reward": f"{m.reward:g}",
            "eval": str(c.eval).lower(),
        }
    if kind == "trainer.step":
        return (
            f"step {m.step}: {len(m.consumed_trajectory_ids)} trained, {len(m.dropped)} dropped",
            {"step": str(m.step), "version": str(m.version)}
            | {k: f"{v:g}" for k, v in sorted(m.metrics.items())},
        )
    if kind == "policy.weights":
        return f"version {m.version} (step {m.step}, parent {m.parent})", {
            "version": str(m.version),
            "step": str(m.step),
            "parent": str(m.parent),
        }
    if kind == "policy.live":
        state = "live" if m.ok else f"failed: {m.error}"
        return f"version {m.version} {state} on {m.replica}", {
            "version": str(m.version),
            "replica": m.replica,
        }
    if kind == "control":
        name = policy_pb2.ControlKind.Name(m.kind).removeprefix("CONTROL_KIND_").lower()
        return f"control {name}" + (f" to {m.version}" if name == "rollback" else ""), {
            "command": name,
            "version": str(m.version),
            "reason": m.reason,
        }
    if kind == "dlq":
        return f"dead letter from {m.consumer}: {m.reason}", {"subject": m.subject, "consumer": m.consumer}
    return kind, {}
