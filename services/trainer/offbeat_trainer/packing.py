"""Packing a step's trajectories into micro-batches by a token budget.

Sequences (prompt + completion ids, never re-tokenized) are placed first-fit-decreasing into
micro-batches of at most `budget` tokens and concatenated into one row with `position_ids` that
restart at 0 for every sequence; transformers derives a block-diagonal causal mask from them, so
packed sequences do not attend to each other. A sequence longer than the budget gets a
micro-batch of its own. Only completion tokens carry loss: each micro-batch lists the positions
whose logits predict a completion token, with that token, its inference log-prob, its advantage
and its normalisation weight (token-level: 1 / completion tokens in the step; sequence-level:
1 / (sequences in the step * its completion length)).

Not covered: splitting one sequence over several micro-batches or ranks (context parallelism).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from offbeat_trainer.batching import Trajectory


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [1, L] long
    position_ids: torch.Tensor  # [1, L] long
    logit_index: torch.Tensor  # [N] positions whose logits predict a completion token
    targets: torch.Tensor  # [N] the completion tokens
    inference_logp: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    weights: torch.Tensor  # [N]
    num_tokens: int  # L
    num_sequences: int

    def to(self, device: torch.device) -> MicroBatch:
        if device.type == "cpu":
            return self
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            logit_index=self.logit_index.to(device),
            targets=self.targets.to(device),
            inference_logp=self.inference_logp.to(device),
            advantages=self.advantages.to(device),
            weights=self.weights.to(device),
        )


def plan(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing bins of indices whose lengths sum to at most `budget`."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return bins


def token_weights(samples: Sequence[Trajectory], normalize: str) -> list[float]:
    """The per-token weight of each sample's completion tokens."""
    if normalize == "token":
        total = sum(len(s.completion_ids) for s in samples)
        return [1.0 / total if total else 0.0 for _ in samples]
    n = sum(1 for s in samples if s.completion_ids)
    return [1.0 / (n * len(s.completion_ids)) if s.completion_ids else 0.0 for s in samples]


def pack(samples: Sequence[Trajectory], *, budget: int, normalize: str) -> list[MicroBatch]:
    weights = token_weights(samples, normalize)
    usable = [i for i, s in enumerate(samples) if s.completion_ids]
    for i in usable:
        if not samples[i].prompt_ids:
            raise ValueError(f"trajectory {samples[i].trajectory_id} has no prompt tokens")
    bins = plan([samples[i].num_tokens for i in usable], budget)
    out = []
    for b in bins:
        ids: list[int] = []
        pos: list[int] = []
        index: list[int] = []
        targets: list[int] = []
        inf: list[float] = []
        adv: list[float] = []
        w: list[float] = []
        for j in b:
            s = samples[usable[j]]
            off = len(ids)
            p, c = len(s.prompt_ids), len(s.completion_ids)
            ids += s.prompt_ids + s.completion_ids
            pos += list(range(p + c))
            index += range(off + p - 1, off + p + c - 1)
            targets += s.completion_ids
            inf += s.inference_logprobs
            adv += [s.advantage] * c
            w += [weights[usable[j]]] * c
        out.append(
            MicroBatch(
                input_ids=torch.tensor([ids], dtype=torch.long),
                position_ids=torch.tensor([pos], dtype=torch.long),
                logit_index=torch.tensor(index, dtype=torch.long),
                targets=torch.tensor(targets, dtype=torch.long),
                inference_logp=torch.tensor(inf, dtype=torch.float32),
                advantages=torch.tensor(adv, dtype=torch.float32),
                weights=torch.tensor(w, dtype=torch.float64).float(),
                num_tokens=len(ids),
                num_sequences=len(b),
            )
        )
    return out


def dummy_micro_batch() -> MicroBatch:
    """A zero-weight micro-batch for a rank with fewer micro-batches than the others (collectives
    in FSDP/DDP need the same number of forward/backward passes on every rank)."""
    return MicroBatch(
        input_ids=torch.zeros((1, 2), dtype=torch.long),
        position_ids=torch.arange(2).unsqueeze(0),
        logit_index=torch.zeros(1, dtype=torch.long),
        targets=torch.zeros(1, dtype=torch.long),
        inference_logp=torch.zeros(1),
        advantages=torch.zeros(1),
        weights=torch.zeros(1),
        num_tokens=0,
        num_sequences=0,
    )
