"""`offbeat admin ...`: talk to a running orchestrator's admin gRPC API, print rich tables.

    offbeat admin status | pause | resume | rollback V | policies | staleness | trajectories [--status S]
    offbeat admin watch [--kind step --kind control ...] [--count N]   (events as the ledger records them)

`--address host:port` (default 127.0.0.1:50151), the token from `--token-file` or
`OFFBEAT_ADMIN_TOKEN`, `--tls-ca FILE` for a TLS server. On the orchestrator's machine,
`--run-dir <state_dir>/<run>` reads the address and the token the orchestrator left there
(`admin.address`; `admin.token`, which it generates when given no token). Errors print the server's status code and message and
exit 1; the token is never printed.

Not covered: anything the API does not offer; any gRPC client can use it (the server has reflection).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ACTIONS = ("status", "pause", "resume", "rollback", "policies", "staleness", "trajectories", "watch")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=ACTIONS, help="what to ask or do")
    p.add_argument("version", nargs="?", type=int, help="rollback target version")
    p.add_argument("--address", help="the orchestrator's admin API, host:port (default 127.0.0.1:50151)")
    p.add_argument("--run-dir", help="<state_dir>/<run>: read admin.address and admin.token from it")
    p.add_argument("--token-file", help="file holding the bearer token (else $OFFBEAT_ADMIN_TOKEN)")
    p.add_argument("--tls-ca", help="PEM CA bundle: connect with TLS and verify the server against it")
    p.add_argument("--status", default="", help="trajectories: only this ledger status")
    p.add_argument("--limit", type=int, default=50, help="trajectories: most rows to show")
    p.add_argument("--reason", default="", help="pause/resume/rollback: recorded in the audit log")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call (watch: none)")
    p.add_argument(
        "--kind", action="append", default=[], help="watch: only these event kinds (step, policy, ...)"
    )
    p.add_argument("--count", type=int, default=0, help="watch: stop after this many events (0: never)")


def _address(args: argparse.Namespace) -> str:
    if args.address:
        return str(args.address)
    if args.run_dir and (Path(args.run_dir) / "admin.address").is_file():
        return (Path(args.run_dir) / "admin.address").read_text().strip()
    return "127.0.0.1:50151"


def _token(args: argparse.Namespace) -> tuple[str, str]:
    """The bearer token and where it came from (for the message when the server refuses it)."""
    if not args.token_file and args.run_dir and not os.environ.get("OFFBEAT_ADMIN_TOKEN"):
        args.token_file = str(Path(args.run_dir) / "admin.token")
    if args.token_file:
        if not Path(args.token_file).is_file():
            raise SystemExit(f"offbeat admin: token file {args.token_file} does not exist")
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise SystemExit(f"offbeat admin: token file {args.token_file} is empty")
        return token, args.token_file
    token = os.environ.get("OFFBEAT_ADMIN_TOKEN", "").strip()
    if not token:
        raise SystemExit(
            "offbeat admin: no token: pass --token-file or --run-dir, or set OFFBEAT_ADMIN_TOKEN"
        )
    return token, "$OFFBEAT_ADMIN_TOKEN (it wins over --run-dir)"


UNSCORED = ("requested", "generated")
"""Ledger statuses of trajectories that have no reward yet (the proto's 0 is not one)."""


def _when(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%d %H:%M:%S") if unix else ""


def main(args: argparse.Namespace) -> int:
    import getpass
    import socket

    import grpc
    from rich.console import Console
    from rich.table import Table

    from offbeat.v1 import admin_pb2, admin_pb2_grpc

    console = Console()
    if args.action == "rollback" and args.version is None:
        console.print("[red]offbeat admin rollback needs a VERSION[/red]")
        return 2
    token, token_source = _token(args)
    metadata = (
        ("authorization", f"Bearer {token}"),
        ("x-offbeat-actor", f"{getpass.getuser()}@{socket.gethostname()}"),
    )
    if args.tls_ca and not Path(args.tls_ca).is_file():
        console.print(f"[red]--tls-ca {args.tls_ca}: no such file[/red]")
        return 2
    if args.tls_ca:
        channel = grpc.secure_channel(
            _address(args), grpc.ssl_channel_credentials(root_certificates=Path(args.tls_ca).read_bytes())
        )
    else:
        channel = grpc.insecure_channel(_address(args))
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    kw: dict[str, Any] = {"metadata": metadata, "timeout": args.timeout}
    try:
        if args.action == "status":
            s = stub.GetStatus(admin_pb2.GetStatusRequest(), **kw)
            t = Table(title=f"run {s.run_id}", show_header=False)
            for k, v in (
                ("trainer step", s.step),
                ("head version", s.head_version),
                ("paused", "yes" if s.paused else "no"),
                ("groups in flight", s.groups_in_flight),
                ("trajectories in flight", s.trajectories_in_flight),
                ("tokens/s", f"{s.tokens_per_s:.1f}"),
                ("trajectories/s", f"{s.trajectories_per_s:.2f}"),
            ):
                t.add_row(k, str(v))
            for status, n in sorted(s.trajectories_by_status.items()):
                t.add_row(f"trajectories {status}", str(n))
            console.print(t)
        elif args.action in ("pause", "resume"):
            if args.action == "pause":
                paused = stub.Pause(admin_pb2.PauseRequest(reason=args.reason), **kw).paused
            else:
                paused = stub.Resume(admin_pb2.ResumeRequest(reason=args.reason), **kw).paused
            console.print("paused" if paused else "running")
        elif args.action == "rollback":
            r = stub.Rollback(admin_pb2.RollbackRequest(version=args.version, reason=args.reason), **kw)
            console.print(
                f"rolled back to version {r.version}: {r.discarded_versions} versions and "
                f"{r.discarded_trajectories} trajectories discarded"
            )
        elif args.action == "policies":
            t = Table(title="policy versions")
            for col in ("version", "step", "parent", "status", "eval reward", "created", "uri"):
                t.add_column(col)
            for p in stub.ListPolicies(admin_pb2.ListPoliciesRequest(), **kw).policies:
                t.add_row(
                    str(p.version),
                    str(p.step),
                    str(p.parent),
                    p.status,
                    f"{p.eval_reward:.3f}" if p.has_eval_reward else "-",
                    _when(p.created_at),
                    p.uri,
                )
            console.print(t)
        elif args.action == "staleness":
            s = stub.GetStaleness(admin_pb2.GetStalenessRequest(), **kw)
            t = Table(
                title=f"staleness of {s.count} trained trajectories (p50 {s.p50:g}, p95 {s.p95:g}, max {s.max})"
            )
            t.add_column("staleness", justify="right")
            t.add_column("trajectories", justify="right")
            for b in s.buckets:
                t.add_row(str(b.staleness), str(b.count))
            console.print(t)
        elif args.action == "watch":
            seen = 0
            for event in stub.WatchEvents(admin_pb2.WatchEventsRequest(kinds=args.kind), metadata=metadata):
                stamp = datetime.fromtimestamp(event.at, tz=UTC).strftime("%H:%M:%S")
                print(f"{stamp} {event.kind:<11} {event.summary}", flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
        else:
            t = Table(title="trajectories" + (f" ({args.status})" if args.status else ""))
            for col in ("id", "group"):  # whole, to be copied: folded rather than cut in a narrow terminal
                t.add_column(col, overflow="fold")
            for col in ("env", "status", "reward", "versions", "step", "staleness", "reason"):
                t.add_column(col)
            shown, token = 0, ""
            while shown < args.limit:
                page = stub.ListTrajectories(
                    admin_pb2.ListTrajectoriesRequest(
                        status=args.status, page_size=min(500, args.limit - shown), page_token=token
                    ),
                    **kw,
                )
                for tr in page.trajectories:
                    versions = "" if tr.first_version < 0 else f"{tr.first_version}-{tr.last_version}"
                    t.add_row(
                        tr.trajectory_id,
                        tr.group_id,
                        tr.env,
                        tr.status,
                        "" if tr.status in UNSCORED else f"{tr.reward:g}",
                        versions,
                        "" if tr.consumed_step < 0 else str(tr.consumed_step),
                        "" if tr.staleness < 0 else str(tr.staleness),
                        tr.reason,
                    )
                shown += len(page.trajectories)
                token = page.next_page_token
                if not token:
                    break
            console.print(t)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        hint = ""
        if code == grpc.StatusCode.UNAUTHENTICATED:
            hint = (
                f"\n  the token sent came from {token_source}; the run's is in <run dir>/admin.token "
                "(or the orchestrator's [orchestrator] admin_token_file)"
            )
        elif code == grpc.StatusCode.UNAVAILABLE:
            hint = (
                f"\n  no orchestrator answered at {_address(args)}: is the run up? "
                "pass --run-dir (it holds admin.address) or --address"
            )
        print(f"offbeat admin {args.action}: {code.name}: {exc.details()}{hint}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    finally:
        channel.close()
    return 0
