"""Run metrics to Weights & Biases: the ledger's trainer steps, eval rewards and trajectory fates.

`[wandb] project = "..."` in the run's TOML turns it on. `offbeat run` logs each trainer step as
its progress loop sees it in the ledger; `offbeat report RUN --wandb` logs a run from the ledger
afterwards (a run under compose or Kubernetes, or one that ran without W&B). Both log the rows
`offbeat report` plots, so W&B and the report agree:

- x axis `trainer/step`; per step `train/<metric>` (reward_mean, loss, mismatch_kl, entropy,
  grad_norm, tokens_per_s, staleness_mean/max, wait_for_batch_s, ...), `trainer/version`, and
  `trajectories/<status>` (counts when the step was logged);
- `eval/reward` of each policy version at its step, logged once a newer version's eval has begun
  (or when the sink closes), since the ledger's eval reward is a mean that grows as eval
  trajectories are scored. A step redone after a rollback is logged again with its new metrics.

`wandb` is an optional extra (`pip install 'offbeat[wandb]'`), imported only when configured.
`mode = "offline"` (the default) writes the run under `<dir>/wandb/` with no network; `wandb sync`
uploads it later. `mode = "online"` streams it (W&B's own login, e.g. `WANDB_API_KEY`).

Not covered: the services' own metrics (Prometheus, `/metrics`), system metrics, artifacts
(checkpoints and weights are not uploaded).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from offbeat.config import Strict

EXTRA_HINT = "pip install 'offbeat[wandb]'"


class WandbConfig(Strict):
    """The `[wandb]` section: where `offbeat run` and `offbeat report --wandb` log metrics."""

    project: str = ""
    """W&B project; empty leaves W&B off."""
    entity: str = ""
    """W&B entity (user or team); empty: the account's default."""
    mode: Literal["offline", "online"] = "offline"
    """`offline` writes the run locally, no network (`wandb sync` uploads it later); `online` streams it."""
    name: str = ""
    """Display name of the W&B run; empty: the offbeat run id."""
    tags: list[str] = Field(default_factory=list)
    """Tags of the W&B run."""
    dir: str = ""
    """Directory W&B writes under (it adds `wandb/`); empty: the run's `[run] state_dir`."""

    @property
    def enabled(self) -> bool:
        return bool(self.project)


class WandbMissingError(RuntimeError):
    """W&B is configured but the `wandb` package is not installed."""


def require_wandb() -> Any:
    """The `wandb` module, or an error that names the extra to install."""
    try:
        import wandb
    except ImportError as exc:
        raise WandbMissingError(
            f"[wandb] is configured (project set) but the wandb package is not installed: {EXTRA_HINT}"
        ) from exc
    return wandb


Step = tuple[int, int, dict[str, Any]]  # (step, version, metrics), as Ledger.step_metrics
Eval = tuple[int, int, float]  # (version, step, eval reward), as Ledger.eval_rewards


class WandbSink:
    """One W&B run fed with ledger rows; `log` may be called with the same rows again and again."""

    def __init__(self, run: Any, *, online: bool = False) -> None:
        self.run = run
        self.online = online
        self._steps: dict[int, dict[str, Any]] = {}  # step -> the metrics logged for it
        self._evals: dict[int, float] = {}  # version -> the eval reward logged for it
        self.closed = False

    @classmethod
    def open(
        cls, cfg: WandbConfig, *, run_id: str, config: dict[str, Any], default_dir: str | Path
    ) -> WandbSink:
        """Start the W&B run (blocking: call it off the event loop)."""
        wandb = require_wandb()
        where = Path(cfg.dir or default_dir)
        where.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity or None,
            name=cfg.name or run_id,
            tags=list(cfg.tags),
            dir=str(where),
            mode=cfg.mode,
            config={"offbeat_run": run_id, **config},
            settings=wandb.Settings(console="off", silent=True),  # the launcher's output stays its own
        )
        run.define_metric("trainer/step")
        run.define_metric("*", step_metric="trainer/step")
        return cls(run, online=cfg.mode == "online")

    @property
    def where(self) -> str:
        """The run's URL (online) or its local directory (offline)."""
        return str((self.online and self.run.url) or Path(self.run.dir).parent)

    def log(
        self, steps: Sequence[Step], evals: Sequence[Eval], fates: dict[str, int], *, final: bool = False
    ) -> int:
        """Log what is new in these rows; return how many rows were logged.

        `final` also logs the newest eval reward (no newer eval will come to complete it).
        """
        logged = 0
        new = [(s, v, m) for s, v, m in steps if self._steps.get(s) != m]
        for i, (step, version, metrics) in enumerate(new):
            row: dict[str, Any] = {"trainer/step": step, "trainer/version": version}
            row.update({f"train/{k}": v for k, v in metrics.items() if isinstance(v, int | float)})
            if i == len(new) - 1:
                row.update({f"trajectories/{k}": n for k, n in fates.items()})
            self.run.log(row)
            self._steps[step] = metrics
            logged += 1
        done = evals if final else evals[:-1]
        for version, step, reward in done:
            if self._evals.get(version) != reward:
                self.run.log({"trainer/step": step, "eval/reward": reward, "eval/version": version})
                self._evals[version] = reward
                logged += 1
        return logged

    def close(
        self, steps: Sequence[Step] = (), evals: Sequence[Eval] = (), fates: dict[str, int] | None = None
    ) -> None:
        """Log the last rows (the newest eval included) and finish the run; later calls do nothing."""
        if self.closed:
            return
        self.closed = True
        try:
            self.log(steps, evals, fates or {}, final=True)
        finally:
            self.run.finish()
