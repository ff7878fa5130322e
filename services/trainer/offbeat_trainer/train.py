"""The optimizer step: forward on packed micro-batches, loss, backward, clip, AdamW, schedule.

`TrainCore` owns the model, optimizer and learning-rate schedule of one process. Under torchrun
every rank receives the whole step batch, packs it the same way and trains its share of the
micro-batches (round-robin, padded with zero-weight micro-batches so every rank runs the same
number of passes); loss weights are global over the step, so the summed gradient does not depend
on how micro-batches are split. Data parallelism is FSDP2 `fully_shard` (gloo on CPU, NCCL on
GPU) or DDP. Log-probs are log_softmax(logits / temperature) of the completion tokens, computed
only at the positions that predict them (`logits_to_keep`). With the default loss and no KL term,
samples of advantage 0 (a group all right or all wrong: most of a step early in RL) are not run
through the model at all, since their gradient is exactly 0; the loss weights still count them,
so the update is the same, and the step's statistics are means over the tokens trained.

Not covered: tensor/pipeline/context parallelism; reading data (`service.py`, `distributed.py`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from offbeat_trainer.batching import Trajectory
from offbeat_trainer.checkpoint import clone_for_save, load_optimizer
from offbeat_trainer.loss import LossSettings, load_loss
from offbeat_trainer.packing import MicroBatch, dummy_micro_batch, pack


@dataclass(frozen=True)
class CoreSettings:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    decay_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    temperature: float = 1.0
    loss: str = "offbeat_trainer.loss:icepop_loss"
    mask_low: float = 0.125
    mask_high: float = 8.0
    kl_coef: float = 0.0
    normalize: str = "token"
    micro_batch_tokens: int = 8192
    activation_checkpointing: bool = False
    autocast_bf16: bool = True
    parallel: str = "auto"
    layout: str = "auto"
    attn_implementation: str = "sdpa"

    @property
    def resolved_layout(self) -> str:
        if self.layout != "auto":
            return self.layout
        if self.attn_implementation.startswith("flash"):
            return "packed"
        return "shared_prompt" if self.attn_implementation == "sdpa" else "padded"

    @classmethod
    def from_config(cls, cfg: Any) -> CoreSettings:
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


def lr_factor(step: int, warmup: int, decay: int, min_ratio: float) -> float:
    """The learning rate of optimizer step `step` (1-based) as a fraction of the peak: linear
    warm-up over `warmup` steps, then constant, or with `decay > warmup` a cosine down to
    `min_ratio` at step `decay` (and `min_ratio` after it)."""
    if warmup and step < warmup:
        return step / warmup
    if decay <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (decay - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def load_model(path: str, *, dtype: str = "float32", attn_implementation: str = "sdpa") -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    )


def completion_logits(model: Any, mb: MicroBatch) -> torch.Tensor:
    """[N, vocab] float32: the logits predicting each completion token of the micro-batch."""
    out = model(
        input_ids=mb.input_ids,
        position_ids=mb.position_ids,
        attention_mask=mb.attention_mask,
        use_cache=False,
        logits_to_keep=mb.logit_index,
    )
    return out.logits[mb.rows, mb.cols].float()  # type: ignore[no-any-return]


def completion_logprobs(
    model: Any, mb: MicroBatch, *, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the completion tokens with grad, their entropies without grad)."""
    logits = completion_logits(model, mb) / temperature
    logsm = F.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, mb.targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


class TrainCore:
    def __init__(self, model: Any, settings: CoreSettings, *, device: torch.device | None = None) -> None:
        self.settings = settings
        self.device = device or torch.device("cpu")
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.loss_fn = load_loss(settings.loss)
        self.loss_settings = LossSettings(settings.mask_low, settings.mask_high, settings.kl_coef)
        # zero-advantage samples add nothing to the default loss's gradient unless a KL term is on
        self.skips_zero_advantage = settings.loss == CoreSettings.loss and settings.kl_coef == 0
        model.to(self.device)
        if settings.activation_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
        self.wrapper = "none"
        if self.world > 1:
            if settings.parallel in ("auto", "fsdp"):
                from torch.distributed.fsdp import fully_shard

                for layer in model.model.layers:
                    fully_shard(layer)
                fully_shard(model)
                self.wrapper = "fsdp"
            else:
                from torch.nn.parallel import DistributedDataParallel

                model = DistributedDataParallel(model)
                self.wrapper = "ddp"
        self.model = model
        self.optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=settings.lr,
            betas=settings.betas,
            weight_decay=settings.weight_decay,
            eps=settings.adam_eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s + 1, settings.warmup_steps, settings.decay_steps, settings.min_lr_ratio),
        )

    @property
    def module(self) -> Any:
        """The underlying HF model (unwrapped from DDP)."""
        return self.model.module if self.wrapper == "ddp" else self.model

    def _sync(self, enabled: bool) -> contextlib.AbstractContextManager[None]:
        if self.wrapper == "ddp" and not enabled:
            return self.model.no_sync()  # type: ignore[no-any-return]
        if self.wrapper == "fsdp":
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def my_micro_batches(self, micro: list[MicroBatch]) -> list[MicroBatch]:
        per_rank = max(1, math.ceil(len(micro) / self.world))
        mine = micro[self.rank :: self.world]
        return mine + [dummy_micro_batch() for _ in range(per_rank - len(mine))]

    def step(self, samples: Sequence[Trajectory]) -> dict[str, float]:
        """One optimizer step over the whole step batch (every rank passes the same samples)."""
        s = self.settings
        started = time.perf_counter()
        micro = pack(
            samples,
            budget=s.micro_batch_tokens,
            normalize=s.normalize,
            layout=s.resolved_layout,
            skip_zero_advantage=self.skips_zero_advantage,
        )
        mine = self.my_micro_batches(micro)
        self.optimizer.zero_grad(set_to_none=True)
        # loss, mismatch_kl, masked, entropy, ratio, tokens, weight of the trained tokens
        sums = torch.zeros(7, dtype=torch.float64)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if s.autocast_bf16 and self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        for i, mb in enumerate(mine):
            mb = mb.to(self.device)
            with self._sync(i == len(mine) - 1):
                with autocast:
                    logp, entropy = completion_logprobs(self.model, mb, temperature=s.temperature)
                out = self.loss_fn(logp, mb.inference_logp, mb.advantages, mb.weights, self.loss_settings)
                (out.loss * self.world).backward()
            w = mb.weights
            sums += torch.tensor(
                [
                    float(out.loss.detach()),
                    float(out.stats.get("mismatch_kl", torch.zeros(())).detach()),
                    float(out.stats.get("masked_fraction", torch.zeros(())).detach()),
                    float((entropy * w).sum()),
                    float(out.stats.get("ratio_mean", torch.zeros(())).detach()),
                    float(mb.num_tokens),
                    float(w.sum()),
                ],
                dtype=torch.float64,
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        if self.distributed:
            dist.all_reduce(sums)
        elapsed = time.perf_counter() - started
        loss, kl, masked, ent, ratio, tokens, trained = sums.tolist()
        mean = 1.0 / trained if trained > 0 else 0.0  # the statistics: means over the trained tokens
        return {
            "loss": loss,
            "mismatch_kl": kl * mean,
            "masked_fraction": masked * mean,
            "entropy": ent * mean,
            "ratio_mean": ratio * mean,
            "trained_sequences": float(sum(m.num_sequences for m in micro)),
            "grad_norm": float(grad_norm),
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "step_s": elapsed,
            "micro_batches": float(len(micro)),
            "lr": float(self.scheduler.get_last_lr()[0]),
        }

    # --- state (collectives under FSDP: every rank calls these) ---------------------------

    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Full (unsharded, CPU) model and optimizer state dicts."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        fresh = not self.optimizer.state
        model_sd, optim_sd = get_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if fresh:
            # get_state_dict gives an optimizer without state one by stepping it with zero grads at
            # lr 0: AdamW's step count is then 1 with empty moments, which makes the first real
            # update ~0.74 lr and shifts every bias correction. Count 0 with empty moments is
            # exactly a fresh AdamW, live and in what is saved.
            saved: Any = optim_sd.get("state", {})  # a dict of per-parameter state dicts
            for states in (self.optimizer.state.values(), saved.values()):
                for state in states:
                    step = state.get("step")
                    if isinstance(step, torch.Tensor):
                        step.zero_()
                    elif step is not None:
                        state["step"] = 0
        return model_sd, optim_sd  # type: ignore[return-value]

    def model_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded, CPU) model state dict, without gathering the optimizer's."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(  # type: ignore[return-value]
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def snapshot(
        self, full: bool, keep: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """What a checkpoint of this step holds: the model's state (copied, as safetensors wants)
        and, if `full`, the optimizer's. `keep`: in CPU memory that later steps do not change, for
        a checkpoint written while the next step trains; the gathered optimizer state shares
        storage with the live tensors on the CPU (all of them for a CPU model, AdamW's step counts
        on a GPU), so it is copied too."""
        if not full:  # a light checkpoint: the optimizer state is neither gathered nor written
            return clone_for_save(self.model_state()), None
        model_sd, opt_sd = self.full_state()
        return clone_for_save(model_sd), copy.deepcopy(opt_sd) if keep else opt_sd

    def load_checkpoint(self, directory: str) -> None:
        """Load model, optimizer and schedule from a checkpoint directory (every rank reads it;
        a light one takes the optimizer state from its full checkpoint)."""
        from safetensors.torch import load_file

        opt = load_optimizer(directory)
        self.load_full_state(load_file(f"{directory}/model.safetensors"), opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])

    def load_full_state(self, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=model_state,  # type: ignore[arg-type]
            optim_state_dict=optim_state,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
        )
