"""A rollout group in flight, and whether the trainer will ever train it.

The trainer trains complete groups only and reports what it drops only with its next step
(docs/contracts.md). A group it will certainly drop whole must therefore stop counting against
the scheduler's budget, or with a tight budget the trainer waits for a batch that never comes.
`never_trained` says so when:

- every sample came back too stale to train (possible only after the live wait timed out);
- every sample touched a rolled-back version (dropped `rolled_back`);
- no sample was judged (`ok` or `parse_error`; infrastructure failures are masked);
- all judged rewards are equal while the trainer filters zero-advantage groups.

A sample that failed before reaching the trainer (dead-lettered, or no completion after the last
attempt) is *lost*: the scheduler tells the trainer so (`REWARD_STATUS_LOST` on `rollout.scored`),
which then trains the rest of the group without it; the rules above look at the rest only.

Not covered: when to dispatch (the scheduler).
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field
from typing import Final

from offbeat.v1 import rollout_pb2

JUDGED: Final = ("ok", "parse_error")
"""Reward statuses the trainer trains on (docs/contracts.md, Reward statuses)."""


@dataclass
class Group:
    """One request (prompt, n samples) from dispatch until every sample is terminal."""

    request: rollout_pb2.RolloutRequest
    """As last sent (its `attempt` counts re-issues)."""
    dispatched_at: float
    """When it was last sent (or resumed after a pause): the time-out counts from here."""
    pending: set[str]
    """Trajectory ids whose completion has not arrived."""
    open: set[str]
    """Trajectory ids not yet in a terminal status."""
    rewards: dict[str, float] = field(default_factory=dict)
    """Trajectory id -> reward of its scored sample."""
    reissuable: bool = True
    """False for a group restored from the ledger whose prompt could not be found again."""
    oldest_step: dict[str, int] = field(default_factory=dict)
    """Trajectory id -> trainer step of the oldest version that generated it (when known)."""
    versions: dict[str, set[int]] = field(default_factory=dict)
    """Trajectory id -> the policy versions that generated it."""
    statuses: dict[str, str] = field(default_factory=dict)
    """Trajectory id -> reward status (`ok`, `parse_error`, ...) of its scored sample."""
    lost: set[str] = field(default_factory=set)
    """Trajectory ids that failed before reaching the trainer (it was told; it trains the rest)."""

    @property
    def eval(self) -> bool:
        return self.request.eval


def never_trained(
    group: Group,
    *,
    step: int,
    max_staleness: int,
    rolled_back_versions: Set[int],
    zero_advantage_dropped: bool,
) -> bool:
    """Whether the trainer will certainly drop the whole group; see the module docstring."""
    lost = group.lost
    n = group.request.n - len(lost)
    oldest = [s for tid, s in group.oldest_step.items() if tid not in lost]
    if len(oldest) == n and all(step - s > max_staleness for s in oldest):
        return True
    versions = [v for tid, v in group.versions.items() if tid not in lost]
    if len(versions) == n and all(v & rolled_back_versions for v in versions):
        return True
    rewards = {tid: r for tid, r in group.rewards.items() if tid not in lost}
    if len(rewards) < n:
        return False
    judged = [r for tid, r in rewards.items() if group.statuses.get(tid) in JUDGED]
    if not judged:
        return True
    return zero_advantage_dropped and max(judged) == min(judged)
