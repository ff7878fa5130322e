"""Building what the trainer announces: weight versions and step reports (the wire messages).

Also resolves `[trainer] weight_store` to a store: `file:///abs`, `nats://bucket`, or a path
relative to `[run] state_dir`. Not covered: the publishing itself (`offbeat.bus`).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from offbeat.v1 import policy_pb2
from offbeat.weights import StoredWeights, WeightStore, open_store
from offbeat_trainer.batching import Dropped, StepBatch
from offbeat_trainer.checkpoint import VersionRecord


def store_uri(weight_store: str, state_dir: str) -> str:
    if "://" in weight_store:
        return weight_store
    path = Path(weight_store)
    if not path.is_absolute():
        path = Path(state_dir).resolve() / path
    return path.resolve().as_uri()


def resolve_store(weight_store: str, state_dir: str, *, js: Any) -> WeightStore:
    return open_store(store_uri(weight_store, state_dir), js=js)


def version_record(stored: StoredWeights, *, step: int, parent: int, checkpoint: str = "") -> VersionRecord:
    """What the trainer keeps (and announces) of a version it has just stored."""
    return VersionRecord(
        step=step,
        parent=parent,
        uri=stored.uri,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        chunk_bytes=stored.chunks.chunk_bytes if stored.chunks else 0,
        chunk_blake3=[d.hex() for d in stored.chunks.digests] if stored.chunks else [],
        checkpoint=checkpoint,
        published_at=time.time(),
    )


def weight_version(run_id: str, version: int, record: VersionRecord) -> policy_pb2.WeightVersion:
    return policy_pb2.WeightVersion(
        run_id=run_id,
        version=version,
        step=record.step,
        parent=record.parent,
        uri=record.uri,
        sha256=record.sha256,
        format="safetensors",
        size_bytes=record.size_bytes,
        published_at=record.published_at,
        chunk_bytes=record.chunk_bytes,
        chunk_blake3=[bytes.fromhex(d) for d in record.chunk_blake3],
    )


def step_report(
    *,
    run_id: str,
    step: int,
    version: int,
    batch: StepBatch,
    dropped: list[Dropped],
    metrics: dict[str, float],
    started_at: float,
) -> policy_pb2.TrainerStep:
    lags = list(batch.staleness.values())
    m = dict(metrics)
    m.update(
        staleness_min=float(min(lags)) if lags else 0.0,
        staleness_mean=statistics.fmean(lags) if lags else 0.0,
        staleness_max=float(max(lags)) if lags else 0.0,
        reward_mean=batch.reward_mean,
        groups=float(batch.groups),
        consumed=float(len(batch.samples)),
        dropped=float(len(dropped)),
    )
    return policy_pb2.TrainerStep(
        run_id=run_id,
        step=step,
        version=version,
        consumed_trajectory_ids=[t.trajectory_id for t in batch.samples],
        dropped=[
            policy_pb2.DroppedTrajectory(
                trajectory_id=d.trajectory_id, reason=d.reason, staleness=d.staleness
            )
            for d in dropped
        ],
        metrics=m,
        started_at=started_at,
        finished_at=time.time(),
        staleness=batch.staleness,
        advantages={t.trajectory_id: t.advantage for t in batch.samples},
    )


def report_msg_id(report: policy_pb2.TrainerStep) -> str:
    first = (
        report.consumed_trajectory_ids[0]
        if report.consumed_trajectory_ids
        else report.dropped[0].trajectory_id
    )
    return f"step:{report.step}:{first}"
