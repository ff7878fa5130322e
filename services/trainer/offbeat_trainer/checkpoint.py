"""Atomic checkpoints: model, optimizer, schedule, RNG, step, versions and data accounting.

A checkpoint is a directory `ckpt-NNNNNNNN` (a counter that only grows, also across rollbacks)
under the checkpoint root. It is written under a hidden temporary name, every file fsynced, then
renamed into place and the root fsynced, so a crash leaves either the whole checkpoint or none;
the newest complete one is what `--resume` loads. Contents:

- `model.safetensors`: the full state dict with Hugging Face names (the same file a published
  version's weights come from), `optimizer.pt` (optimizer + scheduler state), `rng.pt`;
- or, in a *light* checkpoint (`[trainer] optimizer_every` > 1, between the steps that save the
  optimizer), `scheduler.pt` and `optimizer_from` (the name of the newest full checkpoint of the
  lineage) instead of `optimizer.pt`: the optimizer state, as large as the model twice over for
  AdamW, is written every `optimizer_every` steps. Loading a light checkpoint takes the model, the
  accounting and the schedule from it, and the AdamW moments from that full checkpoint, at most
  `optimizer_every - 1` steps older than the weights;
- `state.json`: `TrainerState` (step, versions with their step/parent/uri/sha256/checkpoint,
  next version id, head, members that left groups still buffered, and the last step's report and
  announcement so they can be re-published idempotently after a crash), and where the accounting
  journal stood when it was written.

The accounting (consumed and dropped trajectory ids, ids retired by rollbacks) grows with the run,
so it is not rewritten by every checkpoint: each appends what changed since the previous one to
`accounting.jsonl` beside them (fsynced before the checkpoint is renamed into place) and records
the journal's length and counts. Reading a checkpoint replays the journal up to that length; a
tail beyond the newest checkpoint (a crash between the two writes) is cut by the next save. A
rollback's checkpoint keeps a prefix of the consumed ids, which its entry says (`keep`).

Kept: the newest `keep` checkpoints and the checkpoints that produced the newest
`rollback_window` live published versions (what rollback needs; 0 keeps all of them), and the full
checkpoints those take their optimizer state from. Not covered: sharded (distributed) checkpoint
files; ranks gather the full state and rank 0 writes it.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "ckpt-"
OPTIMIZER_FROM = "optimizer_from"
JOURNAL = "accounting.jsonl"
ACCOUNTING = ("consumed", "dropped", "retired")


@dataclass
class VersionRecord:
    step: int
    parent: int
    uri: str = ""
    sha256: str = ""
    size_bytes: int = 0
    chunk_bytes: int = 0
    chunk_blake3: list[str] = field(default_factory=list)
    """Hex digests of the file's chunks (`offbeat.weights.ChunkDigests`); none in older records."""
    checkpoint: str = ""
    published_at: float = 0.0
    rolled_back: bool = False


def _current(record: dict[str, Any]) -> dict[str, Any]:
    """A version record as this trainer writes it: one saved before chunk digests were BLAKE3 loses
    its sha256 chunk digests, so its version is verified by its sha256 alone if re-announced."""
    if "chunk_sha256" in record:
        record = {k: v for k, v in record.items() if k != "chunk_sha256"}
        record["chunk_bytes"] = 0
    return record


@dataclass
class TrainerState:
    step: int = 0
    head: int = 0
    next_version: int = 1
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    consumed: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    retired: list[str] = field(default_factory=list)
    """Ids consumed by steps that a rollback undid: never trained again, never counted as lost."""
    departed: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    """Groups still buffered at this step -> (group size, ids of members that left them before
    they were taken). Those members' messages are acked by then, so after a restart they are not
    redelivered; this is how their redelivered siblings still make a complete group."""
    last_report: str = ""
    """Hex of the serialized TrainerStep of the newest step (re-published on resume)."""
    last_announcement: str = ""
    """Hex of the serialized WeightVersion last announced (re-published on resume)."""
    last_announcement_id: str = ""
    """Its msg id (`weights:{v}` or `weights:{v}:rollback:{command}`)."""

    def version_steps(self) -> dict[int, int]:
        return {v: r.step for v, r in self.versions.items()}

    def rolled_back_versions(self) -> set[int]:
        return {v for v, r in self.versions.items() if r.rolled_back}

    def counts(self) -> tuple[int, int, int]:
        return len(self.consumed), len(self.dropped), len(self.retired)

    def to_json(self, *, journal: JournalMark | None = None) -> str:
        """Everything; with `journal`, the accounting is left to the journal and its mark is kept."""
        # not `asdict`: it deep-copies every id list, ~0.45 s a checkpoint by 500k trained ids
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["versions"] = {str(k): asdict(v) for k, v in self.versions.items()}
        if journal is not None:
            for name in ACCOUNTING:
                del data[name]
            data["journal"] = journal.to_dict()
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str, *, journal_file: Path | None = None) -> TrainerState:
        data = json.loads(text)
        mark = data.pop("journal", None)
        data["versions"] = {int(k): VersionRecord(**_current(v)) for k, v in data["versions"].items()}
        data["departed"] = {g: (int(n), list(ids)) for g, (n, ids) in data.get("departed", {}).items()}
        state = cls(**data)
        if mark is not None:
            if journal_file is None:
                raise ValueError("this state keeps its accounting in the journal; pass journal_file")
            replay(state, journal_file, JournalMark.from_dict(mark))
        return state


@dataclass(frozen=True)
class JournalMark:
    """Where the accounting journal stood when a checkpoint was written."""

    bytes: int = 0
    counts: tuple[int, int, int] = (0, 0, 0)
    """(consumed, dropped, retired) after replaying it up to `bytes`."""

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JournalMark:
        n_consumed, n_dropped, n_retired = data["counts"]
        return cls(int(data["bytes"]), (int(n_consumed), int(n_dropped), int(n_retired)))


def replay(state: TrainerState, journal_file: Path, mark: JournalMark) -> None:
    """Fill `state`'s accounting from the first `mark.bytes` of the journal."""
    with open(journal_file, "rb") as f:
        data = f.read(mark.bytes)
    consumed: list[str] = []
    dropped: dict[str, str] = {}
    retired: list[str] = []
    problem = f"{len(data)} of {mark.bytes} bytes" if len(data) != mark.bytes else ""
    try:
        for line in data.splitlines() if not problem else ():
            entry = json.loads(line)
            del consumed[entry["keep"] :]
            consumed += entry["consumed"]
            dropped.update(entry["dropped"])
            retired += entry["retired"]
    except (ValueError, KeyError) as exc:
        problem = f"an unreadable entry ({exc!r})"
    state.consumed, state.dropped, state.retired = consumed, dropped, retired
    if not problem and state.counts() != mark.counts:
        problem = f"(consumed, dropped, retired) {state.counts()} instead of {mark.counts}"
    if problem:
        raise ValueError(f"{journal_file} does not hold what the checkpoint recorded: {problem}")


def read_state(directory: Path) -> TrainerState:
    """A checkpoint's `TrainerState` with its accounting, without side effects."""
    return TrainerState.from_json(
        (directory / "state.json").read_text(), journal_file=directory.parent / JOURNAL
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clone_for_save(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors accepts: contiguous, CPU, no shared storage (tied embeddings)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_weights(state: dict[str, torch.Tensor], path: Path, *, cloned: bool = False) -> Path:
    """Write and fsync a safetensors file; `cloned`: `state` came from `clone_for_save` already."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state if cloned else clone_for_save(state), str(path), metadata={"format": "pt"})
    _fsync(path)
    return path


def optimizer_dir(directory: Path) -> Path:
    """The checkpoint directory whose `optimizer.pt` holds the optimizer state of `directory`'s."""
    if (directory / "optimizer.pt").is_file():
        return directory
    if (directory / OPTIMIZER_FROM).is_file():
        return directory.parent / (directory / OPTIMIZER_FROM).read_text().strip()
    raise FileNotFoundError(f"no full checkpoint (with optimizer.pt) for {directory}")


def load_optimizer(directory: str | Path) -> dict[str, Any]:
    """{"optimizer", "scheduler"} of a checkpoint directory, full or light (see the module doc)."""
    d = Path(directory)
    full = optimizer_dir(d)
    saved = torch.load(full / "optimizer.pt", weights_only=False)
    if full == d:
        return saved  # type: ignore[no-any-return]
    return {"optimizer": saved["optimizer"], **torch.load(d / "scheduler.pt", weights_only=False)}


class Checkpoints:
    def __init__(self, root: Path, *, keep: int = 2, rollback_window: int = 0) -> None:
        self.root = root
        self.keep = keep
        self.rollback_window = rollback_window
        root.mkdir(parents=True, exist_ok=True)
        self.journal = root / JOURNAL
        self.mark = self._mark_of(self.latest())
        """Where the next save appends: after the newest checkpoint's entry."""

    def _mark_of(self, name: str | None) -> JournalMark:
        if name is None:
            return JournalMark()
        mark = json.loads((self.root / name / "state.json").read_text()).get("journal")
        # a checkpoint from before the journal holds all its accounting: the next entry has it all
        return JournalMark.from_dict(mark) if mark else JournalMark()

    def _append(self, state: TrainerState) -> JournalMark:
        """Journal what changed since `self.mark` (consumed ids may have been cut back to a prefix
        by a rollback; dropped and retired ids only grow), fsynced; the new mark."""
        n_consumed, n_dropped, n_retired = self.mark.counts
        if len(state.dropped) < n_dropped or len(state.retired) < n_retired:
            raise ValueError("dropped and retired ids only grow; this state has fewer than the journal")
        keep = min(n_consumed, len(state.consumed))
        entry = {
            "step": state.step,
            "keep": keep,
            "consumed": state.consumed[keep:],
            "dropped": dict(itertools.islice(state.dropped.items(), n_dropped, None)),
            "retired": state.retired[n_retired:],
        }
        line = (json.dumps(entry) + "\n").encode()
        with open(self.journal, "ab") as f:
            if f.tell() < self.mark.bytes:
                raise ValueError(
                    f"{self.journal} is shorter than its newest checkpoint recorded ({self.mark.bytes} bytes)"
                )
            f.truncate(self.mark.bytes)  # a tail no checkpoint recorded (a crash before its rename)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return JournalMark(self.mark.bytes + len(line), state.counts())

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.name.startswith(PREFIX) and p.is_dir())

    def latest(self) -> str | None:
        names = self.names()
        return names[-1] if names else None

    def next_name(self) -> str:
        latest = self.latest()
        n = int(latest.removeprefix(PREFIX)) + 1 if latest else 0
        return f"{PREFIX}{n:08d}"

    def save(
        self,
        state: TrainerState,
        *,
        weights_file: Path,
        optimizer: dict[str, Any] | None,
        scheduler: dict[str, Any],
        name: str | None = None,
        rng: dict[str, Any] | None = None,
    ) -> str:
        """Write a checkpoint atomically; `weights_file` (a finished safetensors file) is moved in.
        Without `optimizer` it is a light checkpoint on the newest full one (there must be one).
        `rng`: {"torch", "python"} states taken when the step ended (default: the current ones)."""
        name = name or self.next_name()
        base = None if optimizer is not None else optimizer_dir(self.root / (self.latest() or ""))
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if weights_file.parent == self.root:
            os.replace(weights_file, tmp / "model.safetensors")
        else:
            shutil.copyfile(weights_file, tmp / "model.safetensors")
        if optimizer is not None:
            torch.save({"optimizer": optimizer, "scheduler": scheduler}, tmp / "optimizer.pt")
        else:
            assert base is not None
            torch.save({"scheduler": scheduler}, tmp / "scheduler.pt")
            (tmp / OPTIMIZER_FROM).write_text(base.name)
        rng = rng or {"torch": torch.get_rng_state(), "python": random.getstate()}
        torch.save(rng, tmp / "rng.pt")
        mark = self._append(state)
        (tmp / "state.json").write_text(state.to_json(journal=mark))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        os.replace(tmp, self.root / name)
        _fsync(self.root)
        self.mark = mark
        self.prune(state)
        return name

    def load(self, name: str) -> tuple[TrainerState, dict[str, torch.Tensor], dict[str, Any]]:
        """(state, model state dict, {"optimizer", "scheduler"}); restores the RNG states."""
        d = self.root / name
        state = read_state(d)
        model = load_file(str(d / "model.safetensors"))
        opt = load_optimizer(d)
        rng = torch.load(d / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        return state, model, opt

    def load_state(self, name: str) -> TrainerState:
        """Only `state.json` and the RNG states (model and optimizer: `TrainCore.load_checkpoint`)."""
        d = self.root / name
        rng = torch.load(d / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        return read_state(d)

    def weights_path(self, name: str) -> Path:
        return self.root / name / "model.safetensors"

    def rollback_targets(self, state: TrainerState) -> list[int]:
        """The published versions a rollback can still reach: live ones, the newest `rollback_window`."""
        live = sorted(v for v, r in state.versions.items() if not r.rolled_back and r.checkpoint)
        return live[-self.rollback_window :] if self.rollback_window else live

    def prune(self, state: TrainerState) -> None:
        names = self.names()
        needed = {state.versions[v].checkpoint for v in self.rollback_targets(state)} | set(
            names[-self.keep :]
        )
        needed |= {optimizer_dir(self.root / n).name for n in needed if (self.root / n).is_dir()}
        for name in names[: -self.keep]:
            if name not in needed:
                shutil.rmtree(self.root / name, ignore_errors=True)
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
