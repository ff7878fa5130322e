"""Configuration of the trainer service: the `[trainer]` section of the run TOML.

Covers the optimizer, the loss, batching/packing, checkpoints and weight publication. The run's
shape (`group_size`, `groups_per_step`, `max_staleness`, `max_steps`, `seed`, `state_dir`) lives
in `[run]` and the base model in `[model]`; they are not repeated here. `check_run` checks the
fields that must agree with other sections.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from offbeat.config import (
    DEFAULT_ROLLBACK_WINDOW,
    DEFAULT_TEMPERATURE,
    MIN_TEMPERATURE,
    ConfigError,
    RunConfig,
    RunSection,
    ServiceConfig,
)


class TrainerConfig(ServiceConfig):
    """The `[trainer]` section."""

    lr: float = Field(1e-5, gt=0)
    """Peak AdamW learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    adam_eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear learning-rate warm-up from 0 to `lr`; constant afterwards unless `decay_steps`."""
    decay_steps: int = Field(0, ge=0)
    """With a value above `warmup_steps`: cosine decay from `lr` after warm-up to `min_lr_ratio * lr`
    at this step (usually `[run] max_steps`); 0 keeps the learning rate constant."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Where the cosine decay ends, as a fraction of `lr`."""
    grad_clip: float = Field(1.0, gt=0)
    """Largest global gradient norm; gradients above it are scaled down."""
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=MIN_TEMPERATURE)
    """Sampling temperature of the rollouts; trainer log-probs are log_softmax(logits / T). It must be
    `[orchestrator.sampling] temperature` (checked at start): with another, every importance ratio
    compares two different distributions."""
    loss: str = "offbeat_trainer.loss:icepop_loss"
    """Loss function as `module:function` (see `offbeat_trainer.loss.LossFn`)."""
    mask_low: float = Field(0.125, gt=0)
    """Tokens whose ratio trainer/inference probability is below this get no gradient."""
    mask_high: float = Field(8.0, gt=0)
    """Tokens whose ratio trainer/inference probability is above this get no gradient."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL term (k3 estimator against the inference log-probs); 0 disables it."""
    normalize: str = Field("token", pattern=r"^(token|sequence)$")
    """`token`: loss summed over tokens / tokens in the step; `sequence`: mean per sequence, then mean."""
    std_normalize: bool = False
    """Divide group advantages by the group's reward std (plus 1e-6)."""
    filter_zero_advantage: bool = False
    """Drop groups whose advantages are all zero (reason `zero_advantage`) instead of training them."""
    micro_batch_tokens: int = Field(8192, ge=16)
    """Token budget of one packed micro-batch (prompt + completion tokens)."""
    layout: str = Field("auto", pattern=r"^(auto|packed|padded|shared_prompt)$")
    """Micro-batch layout: `packed` rows (position-id resets; for flash-attention varlen),
    `padded` length-sorted rows (for eager), or `shared_prompt` (padded rows of one group each,
    its prompt computed once; needs `sdpa`); `auto` picks by `attn_implementation`."""
    activation_checkpointing: bool = False
    """Recompute activations in backward (needed for very long sequences)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (`sdpa`, `flash_attention_2`, `eager`)."""
    autocast_bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    torch_threads: int = Field(0, ge=0)
    """Intra-op threads for torch on CPU; 0 keeps torch's default."""
    parallel: str = Field("auto", pattern=r"^(auto|fsdp|ddp)$")
    """Data-parallel wrapper under torchrun: FSDP2 `fully_shard` or DDP; `auto` is FSDP2."""
    dist_timeout_s: float = Field(7 * 24 * 3600.0, gt=0)
    """Collective timeout under torchrun; followers wait in a broadcast while rank 0 waits for data."""
    weights_every: int = Field(1, ge=1)
    """Publish a new policy version every this many steps."""
    weight_store: str = "weights"
    """`file:///abs/path`, `nats://bucket`, or a path relative to `[run] state_dir`."""
    checkpoint_dir: str = "trainer"
    """Checkpoint directory; relative paths resolve under `[run] state_dir`."""
    optimizer_every: int = Field(1, ge=1)
    """Save the optimizer state with every this many steps' checkpoints (and the last step's).
    The checkpoints between are light: model, accounting, schedule and RNG, with the optimizer
    state of the newest full one, so a resume or rollback to them restarts AdamW from moments up
    to `optimizer_every - 1` steps old (the weights and the accounting stay exact). AdamW's state
    is twice the model in size: for large models 10-50 cuts what a step writes by about 3x."""
    overlap_commit: bool = False
    """Make a step durable (weights, checkpoint, announcement, acks) while the next step trains,
    from a snapshot in CPU memory: a copy of the model's state (and the optimizer's on a full
    checkpoint) held until it is written. It hides the commit's waiting (fsyncs, a network weight
    store, ack round trips), not its CPU work; announcements come one step's commit later, so
    more samples can exceed `max_staleness`. Off: each step waits for its own checkpoint."""
    keep_checkpoints: int = Field(2, ge=1)
    """Most recent checkpoints kept besides those of published versions (needed for rollback)."""
    rollback_window: int = Field(DEFAULT_ROLLBACK_WINDOW, ge=0)
    """Checkpoints of the newest this many published versions are kept for rollback (0: all)."""
    batch_wait_log_s: float = Field(30.0, gt=0)
    """Log the buffer's state when waiting this long for a complete step."""
    heartbeat_s: float = Field(10.0, gt=0)
    """Interval of `in_progress` signals on held (not yet acked) scored-trajectory messages."""
    ack_timeout_s: float = Field(5.0, gt=0)
    """Timeout of one synchronous ack after a checkpoint."""

    @model_validator(mode="after")
    def _layout_fits_the_kernel(self) -> TrainerConfig:
        if self.layout == "shared_prompt" and self.attn_implementation != "sdpa":
            raise ValueError(
                f"trainer.layout: shared_prompt needs a 4-D attention mask, which only "
                f"attn_implementation = 'sdpa' takes (not {self.attn_implementation!r})"
            )
        return self


def check_run(cfg: TrainerConfig, run: RunConfig) -> None:
    """ConfigError for a `[trainer]` section that the rest of the run's configuration contradicts."""
    check_run_shape(cfg, run.run)
    check_rollout_temperature(cfg, run)


def check_rollout_temperature(cfg: TrainerConfig, run: RunConfig) -> None:
    """ConfigError unless `temperature` is the one the orchestrator samples training rollouts at
    (read from the raw `[orchestrator.sampling]` section: the trainer does not load its model)."""
    orchestrator = (run.model_extra or {}).get("orchestrator") or {}
    sampled = (orchestrator.get("sampling") or {}).get("temperature", DEFAULT_TEMPERATURE)
    if isinstance(sampled, int | float) and float(sampled) != cfg.temperature:
        raise ConfigError(
            f"[trainer] temperature = {cfg.temperature} but [orchestrator.sampling] temperature = "
            f"{sampled}: the trainer's log-probs would be of another distribution than the samples', "
            f"and every importance ratio wrong; set both to the same value"
        )


def check_run_shape(cfg: TrainerConfig, run: RunSection) -> None:
    """ConfigError for a `[trainer]` section the run's shape makes unworkable, before anything starts.

    A version is published every `weights_every` steps, and a trajectory is trained only if the
    version it was generated by is at most `max_staleness` steps old: with `weights_every` above
    `max_staleness + 1`, the steps after the `max_staleness + 1`-th since the last version find
    every trajectory stale, no batch forms, no version comes, and the run waits forever.
    """
    if cfg.weights_every > run.max_staleness + 1:
        raise ConfigError(
            f"[trainer] weights_every = {cfg.weights_every} exceeds [run] max_staleness + 1 = "
            f"{run.max_staleness + 1}: a version comes every {cfg.weights_every} steps, so step "
            f"{run.max_staleness + 2} after each one finds every trajectory more than "
            f"{run.max_staleness} steps stale and the run stalls with no batch and no new version; "
            f"set weights_every <= max_staleness + 1"
        )
