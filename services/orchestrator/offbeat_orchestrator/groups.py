"""A rollout group in flight, and whether the trainer will ever train it.

The trainer trains complete groups only and reports what it drops only with its next step
(docs/contracts.md). A group it will certainly drop whole must therefore stop counting against
the scheduler's budget, or with a tight budget the trainer waits for a batch that never comes.
`never_trained` says so when:

- every sample came back too stale to train (possible only after the live wait timed out);
- every sample touched a rolled-back version (dropped `rolled_back`);
- a sample failed before reaching the trainer (dead-lettered, or no completion after the last
  attempt), so the group can never be complete (one the trainer itself refused is the exception:
  it trains the rest of the group, and counting that group out only lets one more go early);
- no sample was judged (`ok` or `parse_error`; infrastructure failures are masked);
- all judged rewards are equal while the trainer filters zero-advantage groups.

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
    incomplete: bool = False
    """A sample failed before reaching the trainer, which only trains complete groups."""

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
    n = group.request.n
    if group.incomplete:
        return True
    if len(group.oldest_step) == n and all(step - s > max_staleness for s in group.oldest_step.values()):
        return True
    if len(group.versions) == n and all(v & rolled_back_versions for v in group.versions.values()):
        return True
    if len(group.rewards) < n:
        return False
    judged = [r for tid, r in group.rewards.items() if group.statuses.get(tid) in JUDGED]
    if not judged:
        return True
    return zero_advantage_dropped and max(judged) == min(judged)
