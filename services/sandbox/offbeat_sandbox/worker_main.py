"""The warm worker: runs inside one bwrap sandbox and forks a fresh child for every run.

This file is the whole program of the worker: the service passes its source to the sandbox's
Python (`python -I -S -B -c <source> JOB_FD RESULT_FD`), so it imports only the standard library
and nothing of offbeat. Protocol: the service writes jobs (4-byte big-endian length + marshal of a
dict) on JOB_FD; the worker answers each with one frame of JSON on RESULT_FD (bytes as base64).

Per unit of a job (one run, or one test case in test mode) the worker makes a fresh working
directory on the tmpfs, forks, and in the child sets rlimits, wires stdio to pipes, and runs the
code: Python by `exec` in a fresh `__main__` (no interpreter start-up: that is where the
milliseconds go), bash by `execve`. The worker reads output up to the cap, enforces the wall-clock
deadline, then kills every other process in the sandbox (`kill(-1, SIGKILL)`: the worker is the
pid namespace's subreaper, so daemons come back to it), reaps them, and wipes /tmp. Anything left
behind is an anomaly: the worker reports it and exits, and the service starts a new one.

In test mode the child runs the harness after the solution: it calls the function (or evaluates
the operands of each rewritten assert) and writes records `{"n": nonce, "i": test, ...}` with the
values as tagged plain data on fd 3. It never decides pass or fail: the service compares the values
with the expected ones, which never enter the sandbox.

Not covered here: what the limits are (the service sends them) and grading (the service's grader).
"""

import atexit
import binascii
import ctypes
import fcntl
import json
import marshal
import os
import resource
import select
import signal
import stat
import sys
import time
import traceback
import types

WORK = "/tmp/w"
READ_CHUNK = 65536
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option, value):
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl failed")


# --- framing ---------------------------------------------------------------------------------


def _read_exact(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(fd):
    head = _read_exact(fd, 4)
    if head is None:
        return None
    body = _read_exact(fd, int.from_bytes(head, "big"))
    return None if body is None else marshal.loads(body)


def _send(fd, obj):
    body = json.dumps(obj, separators=(",", ":")).encode()
    data = len(body).to_bytes(4, "big") + body
    while data:
        data = data[os.write(fd, data) :]


def _b64(data):
    return binascii.b2a_base64(data, newline=False).decode()


# --- values crossing to the grader: tagged plain data, exact types ------------------------------

_type = type


def encode(value, depth=0):
    """Plain data only; a subclass or any other object is refused (its `__eq__` never runs)."""
    if depth > 64:
        raise ValueError("value nested too deeply")
    t = _type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        return {"i": str(value)}
    if t is float:
        return {"f": repr(value)}
    if t is list or t is tuple or t is set or t is frozenset:
        tag = "l" if t is list else "t" if t is tuple else "s"
        return {tag: [encode(v, depth + 1) for v in value]}
    if t is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if t is bytes:
        return {"b": value.hex()}
    if t is complex:
        return {"c": [repr(value.real), repr(value.imag)]}
    raise TypeError(f"not plain data: {t.__module__}.{t.__qualname__}")


# --- the child -----------------------------------------------------------------------------------


def _set_limits(lim):
    cpu = max(1, int(-(-lim["cpu"] // 1)))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (lim["mem"], lim["mem"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize"], lim["fsize"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["nofile"], lim["nofile"]))
    # counted per uid in the sandbox's user namespace (kernel >= 5.14): bwrap's init and this
    # worker are the 2 others there; on older kernels the outer bwrap counts too (one less)
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"] + 2, lim["nproc"] + 2))


def _exit_code(exc):
    code = exc.code
    if code is None:
        return 0
    if _type(code) is int:
        return code & 0xFF
    try:
        sys.stderr.write(f"{code}\n")
    except Exception:
        pass
    return 1


def _finish(code):
    try:
        atexit._run_exitfuncs()
    except BaseException:
        pass
    threading = sys.modules.get("threading")
    if threading is not None:
        try:
            threading._shutdown()
        except BaseException:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(code)


def _child_python(job, unit, nonce):
    write, dumps, rec_fd = os.write, json.dumps, 3

    def record(**fields):
        fields["n"] = nonce
        fields["i"] = unit["test"]
        write(rec_fd, (dumps(fields, separators=(",", ":")) + "\n").encode())

    main = types.ModuleType("__main__")
    main.__file__ = f"{WORK}/main.py"
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    sys.argv = ["main.py", *job["args"]]
    sys.path.insert(0, WORK)
    code = 0
    try:
        exec(compile(job["code"], f"{WORK}/main.py", "exec"), main.__dict__)
    except SystemExit as exc:
        _finish(_exit_code(exc))  # in test mode: no record, so no pass
    except BaseException as exc:
        # the traceback starts in main.py, not in this harness
        tb = exc.__traceback__
        traceback.print_exception(_type(exc), exc, tb.tb_next if tb is not None else None)
        _finish(1)
    kind = unit["kind"]
    if kind == "call":
        try:
            fn = main.__dict__.get(unit["function"])
            if fn is None:
                raise NameError(f"function {unit['function']!r} is not defined")
            value = fn(*json.loads(unit["args_json"]))
            record(v=encode(value))
        except BaseException as exc:  # SystemExit too: the call did not return
            record(e=f"{_type(exc).__name__}: {exc}"[:2000])
            code = 1
    elif kind == "assert":

        def check(k, *values):
            record(a=k, v=[encode(v) for v in values])

        main.__dict__["__offbeat_assert__"] = check
        try:
            exec(compile(unit["code"], "<test>", "exec"), main.__dict__)
            record(done=True)
        except BaseException as exc:
            record(e=f"{_type(exc).__name__}: {exc}"[:2000])
            code = 1
    _finish(code)


def _child(job, unit, fds):
    # fds: stdin_r, stdout_w, stderr_w, record_w (or -1); park them high, then 0..3
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, 200 + i) if fd >= 0 else -1 for i, fd in enumerate(fds)]
    for target, fd in enumerate(parked):
        if fd >= 0:
            os.dup2(fd, target)
    os.closerange(4 if parked[3] >= 0 else 3, 1 << 16)
    os.chdir(WORK)
    os.umask(0o077)
    os.setsid()
    _prctl(_PR_SET_DUMPABLE, 1)
    _set_limits(job["limits"])
    if job["lang"] == "bash":
        # Python ignores these; a fresh shell must not inherit that (`yes | head` dies quietly)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.execve("/bin/bash", ["bash", "main.sh", *job["args"]], dict(os.environ))
    _child_python(job, unit, job["nonce"])


# --- the worker: one unit ----------------------------------------------------------------------


def _wipe(path):
    """Delete everything under `path` (also what the run chmod'ed to 000); the path stays."""
    for entry in os.scandir(path):
        full = entry.path
        if entry.is_dir(follow_symlinks=False):
            os.chmod(full, 0o700)
            _wipe(full)
            os.rmdir(full)
        else:
            os.unlink(full)


_WAITED: dict = {}  # pid -> (wait status, rusage) of what the last sweep reaped


def _reap_zombies():
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _WAITED[pid] = (status, usage)


def _sweep():
    """Kill every process of the sandbox but its init and this worker; reap. True when none is left.

    `kill(-1)` inside the pid namespace reaches exactly the sandbox's processes (never pid 1 nor
    the caller) atomically with respect to fork, so a fork bomb cannot outrun it.
    """
    for _ in range(100):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            _reap_zombies()
            return True
        while True:
            try:
                pid, status, usage = os.wait4(-1, 0)
            except ChildProcessError:
                break
            _WAITED[pid] = (status, usage)
    return False


def _run_unit(job, unit):
    lim = job["limits"]
    os.mkdir(WORK, 0o700)
    for name, data in job["files"].items():
        path = os.path.join(WORK, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
    with open(os.path.join(WORK, "main.sh" if job["lang"] == "bash" else "main.py"), "w") as fh:
        fh.write(job["code"])
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    rec_r, rec_w = os.pipe() if unit["kind"] in ("call", "assert") else (-1, -1)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            _child(job, unit, (in_r, out_w, err_w, rec_w))
        finally:
            os._exit(126)
    for fd in (in_r, out_w, err_w, rec_w):
        if fd >= 0:
            os.close(fd)
    pidfd = os.pidfd_open(pid)
    caps = {out_r: lim["out"], err_r: lim["out"], rec_r: lim["out"]}
    bufs = {out_r: bytearray(), err_r: bytearray(), rec_r: bytearray()}
    trunc = {out_r: False, err_r: False, rec_r: False}
    stdin = memoryview(unit["stdin"])
    poller = select.poll()
    for fd in (out_r, err_r, rec_r):
        if fd >= 0:
            poller.register(fd, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    if stdin:
        os.set_blocking(in_w, False)
        poller.register(in_w, select.POLLOUT)
    else:
        os.close(in_w)
        in_w = -1
    open_reads = {fd for fd in (out_r, err_r, rec_r) if fd >= 0}
    deadline = started + lim["wall"]
    timeout = output_limit = exited = False
    while open_reads or not exited:
        remaining = deadline - time.monotonic()
        if remaining <= 0 and not exited:
            timeout = True
            break
        events = poller.poll(max(0, remaining) * 1000 if not exited else 1000)
        if not events and exited:
            break  # a reader that stays open after the child exited and was swept: give up on it
        for fd, _ in events:
            if fd == pidfd:
                exited = True
                poller.unregister(pidfd)
                _sweep()  # nothing outlives the run's main process; the pipes then reach EOF
            elif fd == in_w:
                try:
                    n = os.write(in_w, stdin[:READ_CHUNK])
                    stdin = stdin[n:]
                except BrokenPipeError:
                    stdin = stdin[:0]
                if not stdin:
                    poller.unregister(in_w)
                    os.close(in_w)
                    in_w = -1
            else:
                data = os.read(fd, READ_CHUNK)
                if not data:
                    poller.unregister(fd)
                    open_reads.discard(fd)
                    continue
                buf = bufs[fd]
                buf += data
                if len(buf) > caps[fd]:
                    del buf[caps[fd] :]
                    trunc[fd] = True
                    if fd != rec_r:
                        output_limit = True
        if output_limit:
            break
    if not exited:
        _sweep()
    wall = time.monotonic() - started
    # a run that stopped this worker (SIGSTOP to its parent) and had it continued after the run
    # exited finds the pidfd readable before the deadline is looked at: the clock decides
    timeout = timeout or wall > lim["wall"]
    for fd in open_reads:  # what a killed run wrote before it died: every writer is gone now
        os.set_blocking(fd, False)
        while len(bufs[fd]) <= caps[fd]:
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                break
            if not data:
                break
            bufs[fd] += data
        if len(bufs[fd]) > caps[fd]:
            del bufs[fd][caps[fd] :]
            trunc[fd] = True
    os.close(pidfd)
    for fd in (out_r, err_r, rec_r, in_w):
        if fd >= 0:
            os.close(fd)
    # the run's main process was reaped by _sweep: its status and rusage are in _WAITED
    return {
        "wall": wall,
        "stdout": _b64(bytes(bufs[out_r])),
        "stderr": _b64(bytes(bufs[err_r])),
        "records": _b64(bytes(bufs[rec_r])) if rec_r >= 0 else "",
        "out_trunc": trunc[out_r],
        "err_trunc": trunc[err_r],
        "rec_trunc": trunc[rec_r] if rec_r >= 0 else False,
        "timeout": timeout,
        "output_limit": output_limit,
        "pid": pid,
    }


def _handle(job):
    results = []
    anomaly = ""
    for unit in job["units"]:
        _WAITED.clear()
        res = _run_unit(job, unit)
        waited = _WAITED.get(res.pop("pid"))
        res["exit"], res["signal"], res["cpu"], res["maxrss"] = None, 0, 0.0, 0
        if waited is None:
            anomaly = anomaly or "lost the run's exit status"
        else:
            status, usage = waited
            res["cpu"] = usage.ru_utime + usage.ru_stime
            res["maxrss"] = usage.ru_maxrss * 1024
            if os.WIFSIGNALED(status):
                res["signal"] = os.WTERMSIG(status)
            else:
                res["exit"] = os.WEXITSTATUS(status)
        if not _sweep():
            anomaly = anomaly or "processes survived the sweep"
        try:
            _wipe("/tmp")
        except (OSError, RecursionError) as exc:
            anomaly = anomaly or f"could not wipe /tmp: {exc!r}"
        if os.listdir("/tmp"):
            anomaly = anomaly or "files survived the wipe"
        results.append(res)
        if anomaly:
            break
    return {"id": job["id"], "units": results, "anomaly": anomaly}


def _warm_up():
    """Pay the parser's and the code paths' first-use costs once, not in every forked child."""
    sample = "def f(x, *a, **k):\n    return [i for i in x if i] or {k: v for k, v in k.items()}\n"
    exec(compile(sample + "f([1, 2.0, 'a'], b=None)\n", "<warm-up>", "exec"), {})
    encode({"a": [1, 2.0, (None, True)], "b": {1, 2}})
    json.loads(json.dumps([1, "x", {"y": 2.5}]))


def main():
    job_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    _prctl(_PR_SET_DUMPABLE, 0)  # same uid as the runs: no ptrace, no /proc/<pid>/mem of the worker
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    for fd in (job_fd, result_fd):
        os.set_inheritable(fd, False)
    if not stat.S_ISDIR(os.stat("/tmp").st_mode):
        raise SystemExit("no /tmp")
    _warm_up()
    import gc

    gc.freeze()  # children's collections then leave the worker's objects (and their pages) alone
    _send(result_fd, {"ready": True, "pid": os.getpid()})
    while True:
        job = _recv(job_fd)
        if job is None:
            return
        result = _handle(job)
        _send(result_fd, result)
        del job
        if result["anomaly"]:
            return


if __name__ == "__main__":
    main()
