"""Per-worker cgroups (memory and pids), nested under the service's own cgroup, where the host allows.

A worker's whole process tree (its bwrap, the worker, every run and whatever a run forks) is put in
its own cgroup before the worker program starts: `memory` bounds what all those processes hold
together, tmpfs pages included (RLIMIT_AS bounds one process), and `pids` bounds how many there are
together (a backstop to RLIMIT_NPROC). The cgroup is a child of the service's own cgroup, so the
workers stay inside whatever limits the service itself runs under. cgroup v1 (memory and pids
hierarchies) and v2 (unified, where the parent can delegate both controllers) are supported.

Not covered: when neither is writable (a container with a read-only /sys/fs/cgroup, or a v2 parent
that holds processes and so cannot enable controllers for children), workers run without a cgroup
and the per-process rlimits are the only bound; the service logs that once. CPU and I/O are not
limited here.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

log = logging.getLogger("offbeat_sandbox.cgroups")

ROOT = Path("/sys/fs/cgroup")


def _own_paths() -> dict[str, str]:
    """controller -> this process's cgroup path in it ("" -> the v2 unified path)."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            paths[c] = path
    return paths


def _read_counter(path: Path, key: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


class WorkerCgroup:
    """The cgroup(s) of one worker slot."""

    def __init__(self, dirs: list[Path], oom_file: Path) -> None:
        self.dirs = dirs
        self.oom_file = oom_file

    @classmethod
    def create(cls, name: str, *, memory_bytes: int, pids_max: int) -> WorkerCgroup | None:
        """Create (or reuse) and configure; None when this host does not let us."""
        try:
            return cls._create_v1(name, memory_bytes, pids_max) or cls._create_v2(
                name, memory_bytes, pids_max
            )
        except OSError as exc:
            log.debug("no cgroup for %s: %s", name, exc)
            return None

    @classmethod
    def _create_v1(cls, name: str, memory_bytes: int, pids_max: int) -> WorkerCgroup | None:
        own = _own_paths()
        if "memory" not in own or "pids" not in own:
            return None
        mem = ROOT / "memory" / own["memory"].lstrip("/") / name
        pids = ROOT / "pids" / own["pids"].lstrip("/") / name
        if not mem.parent.is_dir() or not pids.parent.is_dir():
            return None
        mem.mkdir(exist_ok=True)
        pids.mkdir(exist_ok=True)
        (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
        memsw = mem / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # no way around the limit through swap
            memsw.write_text(str(memory_bytes))
        (pids / "pids.max").write_text(str(pids_max))
        return cls([mem, pids], mem / "memory.oom_control")

    @classmethod
    def _create_v2(cls, name: str, memory_bytes: int, pids_max: int) -> WorkerCgroup | None:
        if not (ROOT / "cgroup.controllers").exists():
            return None
        parent = ROOT / _own_paths().get("", "/").lstrip("/")
        enabled = set((parent / "cgroup.subtree_control").read_text().split())
        missing = {"memory", "pids"} - enabled
        if missing:
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(missing)))
        group = parent / name
        group.mkdir(exist_ok=True)
        (group / "memory.max").write_text(str(memory_bytes))
        swap = group / "memory.swap.max"
        if swap.exists():
            swap.write_text("0")
        (group / "pids.max").write_text(str(pids_max))
        return cls([group], group / "memory.events")

    def add(self, pid: int) -> None:
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid))

    def members(self) -> set[int]:
        procs: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                procs |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
        return procs

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer took in this cgroup so far."""
        return _read_counter(self.oom_file, "oom_kill")

    def remove(self) -> None:
        for d in self.dirs:
            with contextlib.suppress(OSError):
                d.rmdir()
