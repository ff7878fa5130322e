"""What `offbeat run` does before it starts the services, for compose and Kubernetes.

The local launcher applies the ledger's migrations and builds (and warm-starts) the base model
that the run TOML asks for before it spawns the services. In containers those steps are one-shot
jobs run from the services' images with this script (copied to /opt/offbeat/prepare.py):

  prepare.py migrate    --config RUN.toml   apply the ledger's migrations (idempotent)
  prepare.py model      --config RUN.toml   make <state_dir>/models/current: the tiny model of
                                            `[launcher] tiny_model` (+ `warm_start`), built by the
                                            launcher's own code, or a local/hub `[model] path`
  prepare.py wait-model --config RUN.toml   wait until <state_dir>/models/current is complete

The services then get `OFFBEAT__MODEL__PATH=<state_dir>/models/current`. Configuration is read as
the services read it: the TOML, then `OFFBEAT__SECTION__FIELD` environment overrides. URLs are
logged masked. Under a StatefulSet, only the pod whose `POD_INDEX` is 0 builds; others wait.

Not covered: anything the services do themselves (streams, consumers, KV buckets).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from offbeat.config import RunConfig, load_run_config, mask_url


def say(text: str) -> None:
    print(f"[prepare] {text}", flush=True)


def current_link(run: RunConfig) -> Path:
    return Path(run.run.state_dir).resolve() / "models" / "current"


def migrate(run: RunConfig) -> None:
    from offbeat.ledger import upgrade

    url = run.ledger.database_url
    deadline = time.monotonic() + 120
    while True:
        try:
            upgrade(url)
            break
        except Exception as exc:  # the database may still be starting: retry, then give up loudly
            if time.monotonic() > deadline:
                raise
            say(
                f"ledger at {mask_url(url)} not ready ({type(exc).__name__}: {mask_url(str(exc))[:300]}); retrying"
            )
            time.sleep(2)
    say(f"ledger migrations applied at {mask_url(url)}")


def _point_current(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, link.parent)
    tmp = link.with_name(f".current.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(rel)
    os.replace(tmp, link)  # atomic: readers see the old or the new model, never a half-made link


def build_model(run: RunConfig, config_path: str) -> Path:
    from offbeat.launcher import Launcher, LauncherConfig

    launcher_cfg = run.section("launcher", LauncherConfig)
    state = Path(run.run.state_dir).resolve()
    if launcher_cfg.tiny_model is not None:
        args = argparse.Namespace(config=config_path, set=[], resume=True, fresh=False)
        launcher = Launcher(run, launcher_cfg, args)
        (launcher.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        built = launcher._model_path()
        assert built is not None
        return Path(built)
    path = run.model.path
    if not path:
        raise SystemExit("prepare: the run config has neither [launcher] tiny_model nor [model] path")
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    local = state / "models" / "hub" / path.replace("/", "--")
    say(f"downloading {path} to {local}")
    snapshot_download(repo_id=path, local_dir=str(local))
    return local


def wait_model(link: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not (link / "config.json").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"prepare: {link} did not appear within {timeout_s:.0f}s")
        time.sleep(2)
    say(f"model ready: {link} -> {os.readlink(link)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prepare.py", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["migrate", "model", "wait-model"])
    p.add_argument("--config", required=True, help="the run TOML")
    p.add_argument("--set", action="append", default=[], metavar="A.B=V", help="override a config field")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="wait-model: how long to wait")
    args = p.parse_args(argv)
    run = load_run_config(args.config, sets=args.set)
    link = current_link(run)
    if args.action == "migrate":
        migrate(run)
    elif args.action == "wait-model" or os.environ.get("POD_INDEX", "0") not in ("", "0"):
        wait_model(link, args.timeout_s)
    else:
        target = build_model(run, args.config)
        _point_current(link, target)
        say(f"model ready: {link} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
