"""Initial ledger schema, with the status-rank function and the terminal-status guard.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(32), nullable=False, server_default="running"),
        sa.Column("config", JSONB, nullable=False, server_default="{}"),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "policy_versions",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("version", sa.BigInteger, primary_key=True),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("parent", sa.BigInteger, nullable=False),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="active"),
        sa.Column("eval_reward", sa.Float),
        sa.Column("eval_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("live_at", TS),
    )
    op.create_table(
        "trajectories",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("trajectory_id", sa.String(64), primary_key=True),
        sa.Column("group_id", sa.String(64)),
        sa.Column("request_id", sa.String(64)),
        sa.Column("env", sa.String(128)),
        sa.Column("prompt_key", sa.Text),
        sa.Column("sample_index", sa.Integer),
        sa.Column("eval", sa.Boolean),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("reward", sa.Float),
        sa.Column("reward_status", sa.String(32)),
        sa.Column("advantage", sa.Float),
        sa.Column("prompt_tokens", sa.Integer),
        sa.Column("completion_tokens", sa.Integer),
        sa.Column("first_version", sa.BigInteger),
        sa.Column("last_version", sa.BigInteger),
        sa.Column("consumed_step", sa.BigInteger),
        sa.Column("staleness", sa.Integer),
        sa.Column("requested_at", TS),
        sa.Column("generated_at", TS),
        sa.Column("scored_at", TS),
        sa.Column("finished_at", TS),
        sa.CheckConstraint(
            "status IN ('requested','generated','scored','trained','discarded_stale',"
            "'discarded_rolled_back','failed','evaluated')",
            name="trajectories_status_known",
        ),
    )
    op.create_index("ix_trajectories_status", "trajectories", ["run_id", "status"])
    op.create_index("ix_trajectories_group_id", "trajectories", ["run_id", "group_id"])
    op.create_table(
        "trainer_steps",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("step", sa.BigInteger, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("consumed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("dropped", sa.Integer, nullable=False, server_default="0"),
        sa.Column("metrics", JSONB, nullable=False, server_default="{}"),
        sa.Column("rolled_back", sa.Boolean, nullable=False, server_default="false"),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
    )
    op.create_table(
        "admin_actions",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False, index=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("args", JSONB, nullable=False, server_default="{}"),
        sa.Column("actor", sa.String(128), nullable=False, server_default=""),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("result", sa.Text, nullable=False, server_default=""),
        sa.Column("at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "dead_letters",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("deliveries", sa.Integer, nullable=False),
        sa.Column("payload_bytes", sa.Integer, nullable=False),
        sa.Column("at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.execute(
        """
        CREATE FUNCTION offbeat_status_rank(s text) RETURNS int LANGUAGE sql IMMUTABLE AS $$
          SELECT CASE s WHEN 'requested' THEN 0 WHEN 'generated' THEN 1 WHEN 'scored' THEN 2
                        WHEN 'trained' THEN 3 WHEN 'discarded_stale' THEN 4
                        WHEN 'discarded_rolled_back' THEN 5 WHEN 'failed' THEN 6
                        WHEN 'evaluated' THEN 7 END
        $$;
        """
    )
    op.execute(
        """
        CREATE FUNCTION offbeat_guard_terminal() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF offbeat_status_rank(OLD.status) >= 3 AND NEW.status IS DISTINCT FROM OLD.status THEN
            RAISE EXCEPTION 'trajectory % is %, a terminal status; refusing change to %',
              OLD.trajectory_id, OLD.status, NEW.status USING ERRCODE = 'check_violation';
          END IF;
          RETURN NEW;
        END $$;
        """
    )
    op.execute(
        "CREATE TRIGGER trajectories_terminal_guard BEFORE UPDATE OF status ON trajectories "
        "FOR EACH ROW EXECUTE FUNCTION offbeat_guard_terminal()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS trajectories_terminal_guard ON trajectories")
    op.execute("DROP FUNCTION IF EXISTS offbeat_guard_terminal()")
    op.execute("DROP FUNCTION IF EXISTS offbeat_status_rank(text)")
    for table in (
        "dead_letters",
        "admin_actions",
        "trainer_steps",
        "trajectories",
        "policy_versions",
        "runs",
    ):
        op.drop_table(table)
