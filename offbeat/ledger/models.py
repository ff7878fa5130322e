"""Ledger tables (SQLAlchemy 2). The schema itself is created by the Alembic migrations."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

IN_FLIGHT: Final = ("requested", "generated", "scored")
TERMINAL: Final = ("trained", "discarded_stale", "discarded_rolled_back", "failed", "evaluated")
STATUSES: Final = IN_FLIGHT + TERMINAL
STATUS_RANK: Final = {s: i for i, s in enumerate(STATUSES)}
REVIVED: Final = ("failed", "trained")
"""The one change a terminal status allows: a sample failed for one copy of its request (a dead
letter) while a re-issued copy went on to be trained. Training is the fact that stands."""


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSONB}


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(32), default="running", server_default="running")
    config: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class PolicyVersion(Base):
    __tablename__ = "policy_versions"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger)
    parent: Mapped[int] = mapped_column(BigInteger)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    eval_reward: Mapped[float | None] = mapped_column(Float)
    eval_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    live_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Trajectory(Base):
    __tablename__ = "trajectories"
    __table_args__ = (
        CheckConstraint(
            "status IN ('requested','generated','scored','trained','discarded_stale',"
            "'discarded_rolled_back','failed','evaluated')",
            name="trajectories_status_known",
        ),
        Index("ix_trajectories_status", "run_id", "status"),
        Index("ix_trajectories_group_id", "run_id", "group_id"),
    )
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    trajectory_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    group_id: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(64))
    env: Mapped[str | None] = mapped_column(String(128))
    prompt_key: Mapped[str | None] = mapped_column(Text)
    sample_index: Mapped[int | None] = mapped_column(Integer)
    eval: Mapped[bool | None] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    reward: Mapped[float | None] = mapped_column(Float)
    reward_status: Mapped[str | None] = mapped_column(String(32))
    advantage: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    first_version: Mapped[int | None] = mapped_column(BigInteger)
    last_version: Mapped[int | None] = mapped_column(BigInteger)
    consumed_step: Mapped[int | None] = mapped_column(BigInteger)
    staleness: Mapped[int | None] = mapped_column(Integer)
    requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    generated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    scored_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TrainerStep(Base):
    __tablename__ = "trainer_steps"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    consumed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    dropped: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    rolled_back: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AdminAction(Base):
    __tablename__ = "admin_actions"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32))
    args: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    actor: Mapped[str] = mapped_column(String(128), default="", server_default="")
    ok: Mapped[bool] = mapped_column(Boolean)
    result: Mapped[str] = mapped_column(Text, default="", server_default="")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DeadLetterRow(Base):
    __tablename__ = "dead_letters"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    subject: Mapped[str] = mapped_column(Text)
    consumer: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    deliveries: Mapped[int] = mapped_column(Integer)
    payload_bytes: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
