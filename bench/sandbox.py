"""Sandbox latency and throughput, end to end through NATS, against a cold subprocess in the same run.

Starts its own nats-server and the real sandbox service (`offbeat-sandbox`, a child process),
then measures `print(1)` through `SandboxClient` at concurrency 1 and 16, and
`subprocess.run([sys.executable, "-c", "print(1)"])` (the cold baseline, no isolation at all).
The last line of stdout is one JSON object:

  p50_ms, p99_ms, runs_per_s          concurrency 1 (p50/p99) and concurrency 16 (runs_per_s)
  c1_p50_ms, c1_p99_ms, c1_runs_per_s, c16_p50_ms, c16_p99_ms, c16_runs_per_s
  cold_subprocess_p50_ms, speedup_vs_cold (cold p50 / sandbox c1 p50), workers, seccomp

Goals on the 2-core machine: p50 <= 5 ms, >= 3x faster than cold, >= 200 runs/s at concurrency 16.

The machine's 1-minute load average after the run is printed too: other work on the same cores
shows up directly in these latencies (the ratio to the cold subprocess, measured in the same run,
is the steadier figure).

Usage: python bench/sandbox.py [--runs 400] [--workers N] [--no-seccomp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from offbeat.infra import NatsServer, free_port
from offbeat.sandbox_client import SandboxClient
from offbeat.v1 import sandbox_pb2 as pb


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cold_subprocess(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, check=True)
        out.append((time.perf_counter() - t) * 1000)
    return out


async def through_service(client: SandboxClient, n: int, concurrency: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = list(range(n))

    async def one_lane() -> None:
        while queue:
            queue.pop()
            t = time.perf_counter()
            result = await client.run("print(1)")
            latencies.append((time.perf_counter() - t) * 1000)
            if result.status != pb.EXEC_STATUS_OK or result.stdout != b"1\n":
                raise RuntimeError(f"unexpected result: {result}")

    started = time.perf_counter()
    await asyncio.gather(*(one_lane() for _ in range(concurrency)))
    return latencies, n / (time.perf_counter() - started)


def start_service(
    nats_url: str, tmp: Path, workers: int, seccomp: bool
) -> tuple[subprocess.Popen[bytes], int]:
    config = tmp / "run.toml"
    config.write_text(f'[run]\nid = "bench"\nstate_dir = "{tmp / "state"}"\n')
    port = free_port()
    exe = Path(sys.executable).parent / "offbeat-sandbox"
    args = [str(exe), "--config", str(config), "--nats-url", nats_url, "--set", f"sandbox.health_port={port}"]
    args += ["--set", f"sandbox.seccomp={str(seccomp).lower()}"]
    if workers:
        args += ["--set", f"sandbox.workers={workers}"]
    args += [
        "--set",
        f"sandbox.uid_base={64500 + (os.getpid() % 300) * 8}",
        "--set",
        "sandbox.log_level=WARNING",
    ]
    log = (tmp / "sandbox.log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"sandbox service did not start:\n{(tmp / 'sandbox.log').read_text()[-3000:]}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--workers", type=int, default=None, help="default: the service's (2 per core)")
    parser.add_argument("--cold-runs", type=int, default=50)
    parser.add_argument("--no-seccomp", action="store_true")
    args = parser.parse_args()
    import nats

    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmpdir:
        tmp = Path(tmpdir)
        server = NatsServer.start(tmp)
        proc, _ = start_service(server.url, tmp, args.workers, not args.no_seccomp)
        nc = await nats.connect(server.url)
        try:
            client = SandboxClient(nc)
            await through_service(client, 50, 4)  # warm-up: connections, first jobs of each worker
            c1, c1_rate = await through_service(client, args.runs, 1)
            c16, c16_rate = await through_service(client, args.runs, 16)
            cold = await asyncio.to_thread(cold_subprocess, args.cold_runs)
        finally:
            await nc.close()
            proc.terminate()
            proc.wait(timeout=30)
            server.stop()
    figures = {
        "p50_ms": round(pct(c1, 0.5), 3),
        "p99_ms": round(pct(c1, 0.99), 3),
        "runs_per_s": round(c16_rate, 1),
        "c1_p50_ms": round(pct(c1, 0.5), 3),
        "c1_p99_ms": round(pct(c1, 0.99), 3),
        "c1_runs_per_s": round(c1_rate, 1),
        "c16_p50_ms": round(pct(c16, 0.5), 3),
        "c16_p99_ms": round(pct(c16, 0.99), 3),
        "c16_runs_per_s": round(c16_rate, 1),
        "cold_subprocess_p50_ms": round(statistics.median(cold), 3),
        "speedup_vs_cold": round(statistics.median(cold) / pct(c1, 0.5), 2),
        "workers": args.workers or "default",
        "cpus": os.cpu_count(),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "seccomp": not args.no_seccomp,
        "runs": args.runs,
    }
    print(
        f"sandbox print(1): c1 p50 {figures['c1_p50_ms']} ms p99 {figures['c1_p99_ms']} ms; "
        f"c16 {figures['c16_runs_per_s']} runs/s (p50 {figures['c16_p50_ms']} ms); "
        f"cold subprocess p50 {figures['cold_subprocess_p50_ms']} ms; {figures['speedup_vs_cold']}x"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
