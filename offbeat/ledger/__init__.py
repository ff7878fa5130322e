"""The ledger: every trajectory's fate, every policy version, every trainer step, in PostgreSQL.

SQLAlchemy 2 models (`models`), Alembic migrations (`migrate`), and the async store with batched
idempotent upserts and the queries the admin API and reports ask (`store`). The orchestrator is
the only writer in a run; anything may read.
"""

from offbeat.ledger.migrate import downgrade, upgrade
from offbeat.ledger.models import IN_FLIGHT, STATUSES, TERMINAL
from offbeat.ledger.store import Ledger, TerminalStatusError, UnknownTrajectoryError

__all__ = [
    "IN_FLIGHT",
    "STATUSES",
    "TERMINAL",
    "Ledger",
    "TerminalStatusError",
    "UnknownTrajectoryError",
    "downgrade",
    "upgrade",
]
