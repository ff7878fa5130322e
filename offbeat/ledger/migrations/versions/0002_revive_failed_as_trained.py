"""The terminal-status guard lets `failed` become `trained` (and nothing else change).

A sample whose first copy was dead-lettered is `failed`; a re-issued copy of the same request may
still be trained, and the ledger must say so (`offbeat.ledger.models.REVIVED`).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _guard(allowed: str) -> str:
    return f"""
        CREATE OR REPLACE FUNCTION offbeat_guard_terminal() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF offbeat_status_rank(OLD.status) >= 3 AND NEW.status IS DISTINCT FROM OLD.status
             AND NOT ({allowed}) THEN
            RAISE EXCEPTION 'trajectory % is %, a terminal status; refusing change to %',
              OLD.trajectory_id, OLD.status, NEW.status USING ERRCODE = 'check_violation';
          END IF;
          RETURN NEW;
        END $$;
        """


def upgrade() -> None:
    op.execute(_guard("OLD.status = 'failed' AND NEW.status = 'trained'"))


def downgrade() -> None:
    op.execute(_guard("false"))
