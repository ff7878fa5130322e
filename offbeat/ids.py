"""What an id on the bus must be for the ledger to hold it.

The ledger keys trajectories by `(run_id, trajectory_id)` in 64-character text columns, and
PostgreSQL's text refuses NUL. A producer that trusts its input (the trainer, reading scored
trajectories from the bus) refuses ids the ledger cannot hold, as malformed; the ledger writer
skips such ids in the reports that name them, since they were never recorded.

Not covered: which characters an id should use (any other text is stored as it is).
"""

from __future__ import annotations

from typing import Final

MAX_ID: Final = 64
"""Longest id the ledger holds (its columns are `String(64)`)."""


def storable_id(value: str) -> bool:
    """Whether the ledger can hold `value` as an id: at most `MAX_ID` characters, no NUL."""
    return len(value) <= MAX_ID and "\x00" not in value
