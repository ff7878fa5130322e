"""`offbeat run CONFIG.toml`: the whole job on one machine, from one command.

Starts the embedded nats-server and PostgreSQL (or uses `--nats-url`/`--database-url`), builds and
warm-starts the tiny model when the config asks for one (cached under the state directory), then
runs the five services as child processes through the same console scripts the containers run
(`offbeat-<service>`), restarts any that die, shows live progress from the ledger and the bus
(logged to Weights & Biases too when `[wandb]` sets a project: `offbeat.wandb_sink`),
and stops everything cleanly when the trainer reaches `[run] max_steps` or on Ctrl-C, SIGTERM or
SIGHUP (a closed terminal). A second `offbeat run --resume` continues the same run from the
trainer's checkpoint and the ledger.

No service outlives the launcher: on Linux the kernel sends each child SIGTERM when the launcher
dies, even by SIGKILL (once per launcher thread; a service drains once, as for one SIGTERM). One
launcher at a time runs a run: it holds an exclusive lock on `<state_dir>/runs/<id>.lock` for its
life (released by the kernel however it ends), and a second `offbeat run` of the same run fails at
once, naming the first one's pid. At its end it stops only the embedded servers it started. The services get the NATS and PostgreSQL URLs (credentials included) in their
environment, never on their command line, where any local user could read them (`ps`).

Not covered: multi-machine placement (compose and Kubernetes run the same services, see deploy/);
the embedded servers outliving a launcher killed by SIGKILL (the next `offbeat run` reuses them);
two launchers of the same run id on different state directories.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from offbeat.config import EX_CONFIG, ConfigError, RunConfig, Strict, load_run_config

if TYPE_CHECKING:
    from offbeat.wandb_sink import WandbConfig, WandbSink

SERVICES = ("sandbox", "inference", "scorer", "trainer", "orchestrator")
URL_ENV = {"bus.nats_url": "OFFBEAT__BUS__NATS_URL", "ledger.database_url": "OFFBEAT__LEDGER__DATABASE_URL"}
"""The server URLs and the environment variables the services get them in (not argv: `ps` shows it)."""
PR_SET_PDEATHSIG = 1


class TinyModelSpec(Strict):
    hidden_size: int = Field(128, ge=16)
    """Hidden size of the locally built Qwen2-architecture model."""
    layers: int = Field(4, ge=1)
    """Decoder layers."""
    heads: int = Field(4, ge=1)
    """Attention heads."""
    kv_heads: int = Field(2, ge=1)
    """Key/value heads (grouped-query attention)."""
    seed: int = 0
    """Initialisation seed."""


class WarmStartSpec(Strict):
    env_index: int = Field(0, ge=0)
    """Which `[[envs]]` entry (with its args) gives the reference answers to train on."""
    examples: int = Field(4000, ge=1)
    """Reference prompt/answer pairs taken from that environment's train split."""
    completion_template: str = "{answer}"
    """How a reference answer becomes the SFT completion (e.g. "```python\\n{answer}```" for code)."""
    data: str = ""
    """Or a JSONL file of prompt/completion pairs instead of an environment."""
    steps: int = Field(150, ge=1)
    """SFT optimizer steps; stop early, so RL has something left to learn (with `target_match`:
    the most it may take)."""
    target_match: float | None = Field(None, gt=0, le=1)
    """Stop at the first check where the mean probability that decoding (`match_temperature`)
    reproduces a held-out reference exactly reaches this: the same starting point on any
    machine, where a step count lands wherever the machine's numerics take it."""
    match_temperature: float = Field(0.0, ge=0)
    """With `target_match`: 0 checks greedy decoding (what the orchestrator's evals use by
    default), T > 0 sampling at T."""
    held_out: int = Field(200, ge=1)
    """With `target_match`: reference pairs held out of training to check it on (the next ones of
    the environment's train split; with `data`, the file's last lines)."""
    match_on_train: bool = False
    """With `target_match`: check it on (the first `held_out` of) the training pairs instead of
    holding any out. For a small fixed dataset (the `code` environment's 18 functions), where
    the point is to reproduce the references and a held-out one could never be learnt."""
    check_every: int = Field(10, ge=1)
    """With `target_match`: SFT steps between checks."""
    extra_args: list[str] = Field(default_factory=list)
    """More arguments for `offbeat-trainer sft` (e.g. ["--lr", "3e-3", "--batch-size", "64"])."""


class LauncherConfig(Strict):
    """The `[launcher]` section: how `offbeat run` starts and supervises the services."""

    services: list[str] = Field(default_factory=lambda: list(SERVICES))
    """Services to start (all five for a full run)."""
    replicas: dict[str, int] = Field(default_factory=dict)
    """Replicas per service, e.g. {scorer = 2}; the trainer and orchestrator are always one."""

    @field_validator("services", "replicas")
    @classmethod
    def _known_services(cls, value: Any) -> Any:
        unknown = sorted(set(value) - set(SERVICES))
        if unknown:
            raise ValueError(f"unknown service {unknown[0]!r}: the services are {', '.join(SERVICES)}")
        return value

    max_restarts: int = Field(5, ge=0)
    """Restarts of one service within `restart_window_s` before the run is stopped as failed."""
    restart_window_s: float = Field(3600.0, gt=0)
    """Seconds a restart counts against `max_restarts`: a service crashing in a loop fails the run,
    one that crashes now and then over a long run does not."""
    progress_interval_s: float = Field(2.0, gt=0)
    """Seconds between progress refreshes."""
    tiny_model: TinyModelSpec | None = None
    """Build a tiny Qwen2 model locally and use it as `[model] path` (no hub is needed)."""
    warm_start: WarmStartSpec | None = None
    """Warm-start the model with `offbeat-trainer sft` first (cached by its settings)."""
    stop_grace_s: float = Field(20.0, gt=0)
    """How long services get to drain after SIGTERM before they are killed."""
    final_eval_timeout_s: float = Field(120.0, ge=0)
    """After the last step, how long to wait for the last version's eval reward."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run TOML file")
    p.add_argument("--set", action="append", default=[], metavar="A.B=V", help="override a config field")
    p.add_argument("--nats-url", help="use this NATS server instead of starting one")
    p.add_argument("--database-url", help="use this PostgreSQL instead of starting one")
    p.add_argument("--resume", action="store_true", help="continue the run from its checkpoint and ledger")
    p.add_argument("--fresh", action="store_true", help="delete the run's previous state first")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live table")
    p.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")


SERVICE_CONFIGS = {
    "orchestrator": "offbeat_orchestrator.config:OrchestratorConfig",
    "inference": "offbeat_inference.config:InferenceConfig",
    "scorer": "offbeat_scorer.config:ScorerConfig",
    "sandbox": "offbeat_sandbox.config:SandboxConfig",
    "trainer": "offbeat_trainer.config:TrainerConfig",
}
"""Each service's own config model, validated up front by `check_config`."""


def check_config(run: RunConfig, launcher: LauncherConfig) -> None:
    """ConfigError for anything the services would refuse at their start, found before a server
    starts or a model is built: each started service's section, the trainer's shape checks, and
    the environments (built, as the orchestrator builds them)."""
    import importlib

    for service in launcher.services:
        module, _, name = SERVICE_CONFIGS[service].partition(":")
        try:
            model = getattr(importlib.import_module(module), name)
        except ImportError as exc:
            raise ConfigError(f"launcher.services: {service} is not installed ({exc})") from None
        config = run.section(service, model)
        if service == "trainer":
            from offbeat_trainer.config import check_run

            check_run(config, run)
    if "orchestrator" in launcher.services:
        from offbeat import envs

        for spec in run.envs:
            try:
                envs.load(spec.name, **spec.args)
            except (KeyError, ValueError, TypeError) as exc:
                raise ConfigError(f"envs: {exc}") from None


def main(args: argparse.Namespace) -> int:
    from offbeat.wandb_sink import WandbConfig, WandbMissingError, require_wandb

    sets = list(args.set)
    try:
        run = load_run_config(args.config, sets=sets)
        launcher = run.section("launcher", LauncherConfig)
        wandb = run.section("wandb", WandbConfig)
        if wandb.enabled:
            require_wandb()  # before any server or service starts
        check_config(run, launcher)
    except (ConfigError, WandbMissingError) as exc:
        print(f"offbeat run: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "check", False):  # callers that build the namespace themselves leave it out
        print(f"offbeat run: {args.config}: the configuration is valid")
        return 0
    from offbeat.infra import InfraError

    try:
        return asyncio.run(Launcher(run, launcher, args, wandb=wandb).run())
    except InfraError as exc:
        print(f"offbeat run: the embedded NATS/PostgreSQL servers: {exc}", file=sys.stderr)
        return 1


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


@functools.cache
def _prctl() -> Any:
    return ctypes.CDLL(None, use_errno=True).prctl


def _die_with_launcher() -> Callable[[], None] | None:
    """A `preexec_fn` by which the kernel sends the child SIGTERM when the launcher dies, however it
    dies (SIGKILL too); the child keeps it across exec. Linux only: None elsewhere."""
    if sys.platform != "linux":
        return None
    prctl, launcher, term = _prctl(), os.getpid(), int(signal.SIGTERM)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, term)
        if os.getppid() != launcher:  # it died before the prctl
            os._exit(1)

    return preexec


@dataclass
class Child:
    service: str
    index: int
    argv: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    restarted: list[float] = field(default_factory=list)
    """time.monotonic() of the restarts within the launcher's restart window."""
    expected_exit: bool = False
    started: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.service if self.index == 0 else f"{self.service}-{self.index}"


class Launcher:
    def __init__(
        self,
        run: RunConfig,
        launcher: LauncherConfig,
        args: argparse.Namespace,
        *,
        wandb: WandbConfig | None = None,
    ) -> None:
        self.run_cfg = run
        self.cfg = launcher
        self.wandb = wandb
        self.args = args
        self.state = Path(run.run.state_dir).resolve()
        self.run_dir = self.state / "runs" / run.run.id
        # services keep their state (checkpoints, weights) per run; the embedded servers are shared
        own = [s for s in args.set if s.partition("=")[0].strip() not in URL_ENV]  # the launcher's URLs win
        self.sets: list[str] = [*own, f"run.state_dir={json.dumps(str(self.run_dir))}"]
        self.child_env: dict[str, str] = {}
        self.children: list[Child] = []
        self.stopping = asyncio.Event()
        self.failed: str | None = None
        self.interrupted = False
        self.infra: Any = None

    # --- preparation -------------------------------------------------------------------------

    def _lock(self) -> int:
        """Take the run's lock (an open fd holding it) or exit naming the launcher that holds it."""
        path = self.state / "runs" / f"{self.run_cfg.run.id}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SystemExit(
                f"offbeat run: run {self.run_cfg.run.id!r} in {self.state} is already running "
                f"(offbeat run pid {holder}); stop that one first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def _prepare_dirs(self) -> None:
        if self.args.fresh and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        if self.run_dir.exists() and not self.args.resume and any(self.run_dir.iterdir()):
            raise SystemExit(
                f"offbeat run: run {self.run_cfg.run.id!r} already has state in {self.run_dir}; "
                "use --resume to continue it, --fresh to start over, or another run.id"
            )
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)

    def _start_infra(self) -> tuple[str, str]:
        if self.args.nats_url and self.args.database_url:
            return self.args.nats_url, self.args.database_url
        from offbeat.infra import Infra

        self.infra = Infra.up(self.state / "infra", max_payload_bytes=self.run_cfg.bus.max_payload_bytes)
        return self.args.nats_url or self.infra.nats.url, self.args.database_url or self.infra.postgres.url

    async def _model_path(self) -> str | None:
        """Build/warm-start the tiny model if asked; return the path services should load (None
        also when the run is stopped during the warm start)."""
        spec = self.cfg.tiny_model
        if spec is None:
            return None
        from offbeat.tinymodel import ensure_tiny_model

        key = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:10]
        base = ensure_tiny_model(
            self.state / "models" / f"tiny-{key}",
            hidden_size=spec.hidden_size,
            layers=spec.layers,
            heads=spec.heads,
            kv_heads=spec.kv_heads,
            seed=spec.seed,
        )
        warm = self.cfg.warm_start
        if warm is None:
            return str(base)
        out = self.state / "models" / f"sft-{self._warm_start_key(key, warm)}"
        if (out / "sft.json").exists():  # SFT writes it last: a finished warm start
            self._say(f"warm start cached: {out}")
            return str(out)
        cmd = [
            _bin("offbeat-trainer"),
            "sft",
            "--model",
            str(base),
            "--out",
            str(out),
            "--steps",
            str(warm.steps),
        ]
        train, held_out = self._warm_start_pairs(warm, out)
        cmd += ["--data", str(train)]
        if warm.target_match is not None:
            cmd += [
                "--held-out",
                str(held_out),
                "--target-match",
                str(warm.target_match),
                "--check-every",
                str(warm.check_every),
                "--match-temperature",
                str(warm.match_temperature),
            ]
        cmd += ["--seed", str(self.run_cfg.run.seed), *warm.extra_args]
        self._say(f"warm start: {' '.join(cmd[1:])}")
        log = self.run_dir / "logs" / "sft.log"
        with log.open("ab") as out_f:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=out_f, stderr=asyncio.subprocess.STDOUT, preexec_fn=_die_with_launcher()
            )
        code = await self._exit_or_stop(proc)
        if code is None:
            return None
        if code != 0:
            raise SystemExit(f"offbeat run: warm start failed (exit {code}); see {log}")
        return str(out)

    async def _exit_or_stop(self, proc: asyncio.subprocess.Process) -> int | None:
        """`proc`'s exit status; None if the run is stopped first (`proc` is then terminated)."""
        exited = asyncio.ensure_future(proc.wait())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if exited.done():
            return exited.result()
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(exited, timeout=self.cfg.stop_grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        return None

    async def _forget_run(self, nats_url: str, database_url: str) -> None:
        """--fresh: remove the run's stream, KV bucket and ledger rows (its directory is already gone)."""
        import nats.js.errors

        from offbeat.bus import Bus
        from offbeat.ledger import Ledger

        bus = await Bus.connect(
            self.run_cfg.bus.model_copy(update={"nats_url": nats_url}),
            self.run_cfg.run.id,
            name="offbeat-run",
        )
        try:
            await bus.delete_streams()
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await bus.js.delete_key_value(bus.subjects.kv_bucket)
        finally:
            await bus.close()
        ledger = Ledger.connect(database_url, pool_size=1)
        try:
            await ledger.forget_run(self.run_cfg.run.id)
        finally:
            await ledger.close()

    def _warm_start_key(self, base_key: str, warm: WarmStartSpec) -> str:
        """The warm start's cache key: everything its result depends on. The base model, the spec,
        the run's seed (SFT's example order), and what it trains on: the data file's bytes, or the
        environment entry (name and args) whose reference answers it takes."""
        digest = hashlib.sha256(f"{base_key}\n{warm.model_dump_json()}\n{self.run_cfg.run.seed}\n".encode())
        if warm.data:
            if not Path(warm.data).is_file():
                raise SystemExit(f"offbeat run: launcher.warm_start.data {warm.data!r} is not a file")
            digest.update(Path(warm.data).read_bytes())
        elif warm.env_index < len(self.run_cfg.envs):
            digest.update(self.run_cfg.envs[warm.env_index].model_dump_json(exclude={"weight"}).encode())
        return digest.hexdigest()[:10]

    def _warm_start_pairs(self, warm: WarmStartSpec, stem: Path) -> tuple[Path, Path]:
        """(training pairs, held-out pairs) as JSONL: `warm.examples` reference answers of an
        environment's train split (with the run's env args), then `warm.held_out` more, or a
        user's `data` file (copied without its last `held_out` lines when `target_match` is set;
        else used as it is, and the held-out path is not written). With `match_on_train` nothing
        is held out: the check takes the first `held_out` training pairs."""
        train, held = stem.with_suffix(".jsonl"), stem.with_suffix(".held-out.jsonl")
        checking = warm.target_match is not None
        on_train = checking and warm.match_on_train
        holding = warm.held_out if checking and not on_train else 0
        if warm.data and not checking:
            return Path(warm.data), held  # trained on as it is; nothing held out
        if warm.data:
            lines = [line for line in Path(warm.data).read_text().splitlines() if line.strip()]
            source = "launcher.warm_start.data"
        else:
            lines = self._reference_answers(warm, warm.examples + holding)
            source = f"[[envs]][{warm.env_index}]'s train split"
        if holding and len(lines) <= holding:
            raise SystemExit(
                f"offbeat run: {source} has {len(lines)} pairs; holding out {holding} for target_match "
                "leaves none to train on (launcher.warm_start.match_on_train checks on training pairs)"
            )
        cut = len(lines) - holding
        train.write_text("\n".join(lines[:cut]) + "\n")
        held.write_text("\n".join(lines[: warm.held_out] if on_train else lines[cut:]) + "\n")
        return train, held

    def _reference_answers(self, warm: WarmStartSpec, n: int) -> list[str]:
        """`n` prompt/answer pairs of an environment's train split (with the run's env args), as JSON lines."""
        from offbeat.envs import load

        if warm.env_index >= len(self.run_cfg.envs):
            raise SystemExit(
                f"offbeat run: launcher.warm_start.env_index {warm.env_index} names no [[envs]] entry"
            )
        spec = self.run_cfg.envs[warm.env_index]
        env = load(spec.name, **spec.args)
        lines = []
        for example in env.examples("train", seed=self.run_cfg.run.seed + 1):
            if example.answer is not None:
                completion = warm.completion_template.format(answer=example.answer)
                lines.append(json.dumps({"prompt": example.prompt, "completion": completion}))
            if len(lines) >= n:
                break
        return lines

    # --- children ----------------------------------------------------------------------------

    def _child_argv(self, service: str, model: str | None) -> list[str]:
        argv = [_bin(f"offbeat-{service}"), "--config", str(Path(self.args.config).resolve())]
        for item in self.sets:
            argv += ["--set", item]
        if model:
            argv += ["--set", f"model.path={json.dumps(model)}"]
        if self.args.resume or any(c.service == service and c.restarts for c in self.children):
            argv.append("--resume")
        return argv

    async def _spawn(self, child: Child) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.child_env}
        argv = list(child.argv)
        if child.restarts and "--resume" not in argv:
            argv.append("--resume")
        out = child.log_path.open("ab")
        child.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the launcher only: it stops them in order
            preexec_fn=_die_with_launcher(),
        )
        out.close()
        child.started.append(time.time())

    async def _start_services(self, model: str | None) -> None:
        for service in self.cfg.services:
            count = 1 if service in ("trainer", "orchestrator") else max(1, self.cfg.replicas.get(service, 1))
            for i in range(count):
                if self.stopping.is_set():
                    return
                child = Child(
                    service,
                    i,
                    self._child_argv(service, model),
                    self.run_dir / "logs" / f"{service}{'' if i == 0 else f'-{i}'}.log",
                )
                self.children.append(child)
                await self._spawn(child)

    async def _supervise(self, child: Child) -> None:
        while not self.stopping.is_set():
            assert child.proc is not None
            code = await child.proc.wait()
            if self.stopping.is_set() or child.expected_exit:
                return
            if child.service == "trainer" and code == 0:
                self._say("trainer finished")
                self.stopping.set()
                return
            if code == EX_CONFIG:  # its configuration is wrong: starting it again cannot help
                said = child.log_path.read_text(errors="replace").strip().splitlines()
                self.failed = (
                    f"{child.name}: {said[-1] if said else 'configuration error'} (see {child.log_path})"
                )
                self.stopping.set()
                return
            now, window = time.monotonic(), self.cfg.restart_window_s
            child.restarted = [t for t in child.restarted if now - t < window]
            if len(child.restarted) >= self.cfg.max_restarts:
                self.failed = (
                    f"{child.name} exited {code} after {len(child.restarted)} restarts in {window:g}s; "
                    f"see {child.log_path}"
                )
                self.stopping.set()
                return
            child.restarts += 1
            child.restarted.append(now)
            self._say(
                f"{child.name} exited {code}; restarting "
                f"({len(child.restarted)}/{self.cfg.max_restarts} in {window:g}s)"
            )
            await asyncio.sleep(min(2.0 * len(child.restarted), 10.0))
            if self.stopping.is_set():
                return
            await self._spawn(child)

    async def _stop_children(self) -> None:
        order = ["orchestrator", "inference", "scorer", "trainer", "sandbox"]
        for service in order:
            for child in [c for c in self.children if c.service == service]:
                if child.proc and child.proc.returncode is None:
                    child.expected_exit = True
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.stop_grace_s
        for child in self.children:
            if child.proc is None:
                continue
            try:
                await asyncio.wait_for(child.proc.wait(), timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                await child.proc.wait()

    # --- the run -----------------------------------------------------------------------------

    async def _open_wandb(self) -> WandbSink | None:
        if self.wandb is None or not self.wandb.enabled:
            return None
        from offbeat.config import resolved_dump
        from offbeat.wandb_sink import WandbSink

        sink = await asyncio.to_thread(
            WandbSink.open,
            self.wandb,
            run_id=self.run_cfg.run.id,
            config=resolved_dump(self.run_cfg),
            default_dir=self.state,
        )
        self._say(f"W&B ({self.wandb.mode}): {sink.where}")
        return sink

    def _interrupt(self) -> None:
        self.interrupted = True
        self.stopping.set()

    def _say(self, text: str) -> None:
        print(f"[offbeat] {text}", flush=True)

    async def run(self) -> int:
        lock = self._lock()
        try:
            return await self._run()
        finally:
            os.close(lock)

    async def _run(self) -> int:
        self._prepare_dirs()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._interrupt)
        nats_url, database_url = self._start_infra()
        self.child_env = {URL_ENV["bus.nats_url"]: nats_url, URL_ENV["ledger.database_url"]: database_url}
        sink = None
        try:
            sink = await self._open_wandb()  # a W&B misconfiguration fails before any service starts
            model = await self._model_path()
            if self.stopping.is_set():
                return 0
            from offbeat.ledger import upgrade

            await asyncio.to_thread(upgrade, database_url)
            if self.args.fresh:
                await self._forget_run(nats_url, database_url)
            await self._start_services(model)
            self._say(
                f"run {self.run_cfg.run.id}: {len(self.children)} processes; logs in {self.run_dir / 'logs'}"
            )
            from offbeat.progress import Progress

            progress = await Progress.open(
                self.run_cfg, nats_url, database_url, live=not self.args.no_progress, wandb=sink
            )
            supervisors = [asyncio.create_task(self._supervise(c)) for c in self.children]
            await progress.follow(self.stopping, interval_s=self.cfg.progress_interval_s)
            if self.failed is None and not self.interrupted and self.cfg.final_eval_timeout_s:
                await progress.wait_final_eval(timeout_s=self.cfg.final_eval_timeout_s)
            await self._stop_children()
            for task in supervisors:
                task.cancel()
            summary = await progress.summary()
            await progress.close()
            self._say(summary)
            if not self.args.no_report and self.failed is None and not self.interrupted:
                from offbeat.report import write_report

                out = await write_report(database_url, self.run_cfg.run.id, self.run_dir / "report")
                self._say(f"report: {out}")
        finally:
            if any(c.proc and c.proc.returncode is None for c in self.children):
                await self._stop_children()
            if sink is not None:  # finished already unless the run failed half-way
                await asyncio.to_thread(sink.close)
            if self.infra is not None:
                self.infra.down(only_started_here=True)  # servers another run uses stay up
        if self.failed:
            print(f"offbeat run: {self.failed}", file=sys.stderr)
            return 1
        return 0
