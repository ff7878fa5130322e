"""Packing a step's trajectories into micro-batches by a token budget.

Two layouts of the same sequences (prompt + completion ids, never re-tokenized):

- `packed`: first-fit-decreasing into micro-batches of at most `budget` tokens, concatenated into
  one row with `position_ids` that restart at 0 for every sequence; transformers derives a
  block-diagonal causal mask from them (varlen kernels with flash-attention, so no padding and no
  quadratic cost across sequences). The layout for `flash_attention_2`.
- `padded`: sequences sorted by length and cut into rows of a right-padded [B, Lmax] batch with
  B * Lmax <= budget, so padding is small and attention costs about the sum of squared lengths
  with any kernel (a micro-batch of one sequence needs no mask at all: the causal fast path).
  The layout for `eager`, where a packed row would pay for attention across sequences.
- `shared_prompt`: like `padded`, but the samples of one group, which share their prompt, share
  one row: the prompt once, then each completion, with a 4-D mask that lets a completion see the
  prompt and itself only and position ids that restart each completion after the prompt. A
  group of n samples costs prompt + n completions tokens instead of n x (prompt + completion):
  with short answers to longer prompts, most of a padded step. The layout for `sdpa`.

A sequence longer than the budget gets a micro-batch of its own. Only completion tokens carry loss: each micro-batch lists the positions
whose logits predict a completion token, with that token, its inference log-prob, its advantage
and its normalisation weight (token-level: 1 / completion tokens in the step; sequence-level:
1 / (sequences in the step * its completion length)).

Not covered: splitting one sequence over several micro-batches or ranks (context parallelism).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from offbeat_trainer.batching import Trajectory


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, L] long
    position_ids: torch.Tensor | None  # [B, L] long (packed and shared_prompt layouts)
    attention_mask: torch.Tensor | None  # [B, L] (padded, with padding); [B, 1, L, L] bool (shared_prompt)
    logit_index: torch.Tensor  # [K] sequence positions whose logits are computed (logits_to_keep)
    rows: torch.Tensor  # [N] row of each completion token's predicting logit
    cols: torch.Tensor  # [N] its index into logit_index
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
            position_ids=None if self.position_ids is None else self.position_ids.to(device),
            attention_mask=None if self.attention_mask is None else self.attention_mask.to(device),
            logit_index=self.logit_index.to(device),
            rows=self.rows.to(device),
            cols=self.cols.to(device),
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


def plan_padded(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices sorted by length (longest first), cut into rows while rows * longest <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    for i in order:
        if bins and (len(bins[-1]) + 1) * lengths[bins[-1][0]] <= budget:
            bins[-1].append(i)
        else:
            bins.append([i])
    return bins


def pack(
    samples: Sequence[Trajectory],
    *,
    budget: int,
    normalize: str,
    layout: str = "packed",
    skip_zero_advantage: bool = False,
) -> list[MicroBatch]:
    """Micro-batches of the step's samples; loss weights are normalised over all of them. With
    `skip_zero_advantage`, samples whose advantage is 0 are left out of the micro-batches (their
    weights still count in the normalisation): exact for losses whose gradient is proportional to
    the advantage, and on a group-relative step often most of the batch."""
    weights = token_weights(samples, normalize)
    usable = [
        i
        for i, s in enumerate(samples)
        if s.completion_ids and not (skip_zero_advantage and s.advantage == 0.0)
    ]
    for i in usable:
        if not samples[i].prompt_ids:
            raise ValueError(f"trajectory {samples[i].trajectory_id} has no prompt tokens")
    if layout == "shared_prompt":
        units: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for i in usable:
            units.setdefault((samples[i].group_id, tuple(samples[i].prompt_ids)), []).append(i)
        members = list(units.values())
        sizes = [
            len(samples[m[0]].prompt_ids) + sum(len(samples[i].completion_ids) for i in m) for m in members
        ]
        return [
            _shared_micro_batch([[(samples[i], weights[i]) for i in members[u]] for u in b])
            for b in plan_padded(sizes, budget)
        ]
    lengths = [samples[i].num_tokens for i in usable]
    bins = plan(lengths, budget) if layout == "packed" else plan_padded(lengths, budget)
    return [
        _micro_batch([samples[usable[j]] for j in b], [weights[usable[j]] for j in b], layout) for b in bins
    ]


@dataclass
class _Completions:
    """A micro-batch's completion tokens: the row and position of each one's predicting logit, the
    token, its inference log-prob, advantage and loss weight."""

    rows: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    inf: list[float] = field(default_factory=list)
    adv: list[float] = field(default_factory=list)
    w: list[float] = field(default_factory=list)

    def add(self, s: Trajectory, weight: float, row: int, positions: Sequence[int]) -> None:
        c = len(s.completion_ids)
        self.rows += [row] * c
        self.positions += positions
        self.targets += s.completion_ids
        self.inf += s.inference_logprobs
        self.adv += [s.advantage] * c
        self.w += [weight] * c

    def micro_batch(
        self,
        rows_ids: list[list[int]],
        *,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        num_sequences: int,
    ) -> MicroBatch:
        width = max(len(r) for r in rows_ids)
        keep = sorted(set(self.positions))
        where = {p: k for k, p in enumerate(keep)}
        return MicroBatch(
            input_ids=torch.tensor([r + [0] * (width - len(r)) for r in rows_ids], dtype=torch.long),
            position_ids=position_ids,
            attention_mask=attention_mask,
            logit_index=torch.tensor(keep, dtype=torch.long),
            rows=torch.tensor(self.rows, dtype=torch.long),
            cols=torch.tensor([where[p] for p in self.positions], dtype=torch.long),
            targets=torch.tensor(self.targets, dtype=torch.long),
            inference_logp=torch.tensor(self.inf, dtype=torch.float32),
            advantages=torch.tensor(self.adv, dtype=torch.float32),
            weights=torch.tensor(self.w, dtype=torch.float32),
            num_tokens=sum(len(r) for r in rows_ids),
            num_sequences=num_sequences,
        )


def _shared_micro_batch(units: list[list[tuple[Trajectory, float]]]) -> MicroBatch:
    """One row per group: its prompt, then its completions, each seeing only the prompt and itself."""
    rows_ids: list[list[int]] = []
    rows_pos: list[list[int]] = []
    spans: list[list[tuple[int, int]]] = []  # per row: the prompt's span, then each completion's
    out = _Completions()
    for r, unit in enumerate(units):
        prompt = unit[0][0].prompt_ids
        p = len(prompt)
        ids, pos, span = list(prompt), list(range(p)), [(0, p)]
        for s, sw in unit:
            start, c = len(ids), len(s.completion_ids)
            ids += s.completion_ids
            pos += range(p, p + c)
            span.append((start, start + c))
            out.add(s, sw, r, [p - 1, *range(start, start + c - 1)])
        rows_ids.append(ids)
        rows_pos.append(pos)
        spans.append(span)
    width = max(len(r) for r in rows_ids)
    mask = torch.zeros((len(rows_ids), 1, width, width), dtype=torch.bool)
    for r, span in enumerate(spans):
        (_, p), *completions = span
        mask[r, 0, :p, :p] = torch.ones((p, p), dtype=torch.bool).tril()
        for a, b in completions:
            mask[r, 0, a:b, :p] = True
            mask[r, 0, a:b, a:b] = torch.ones((b - a, b - a), dtype=torch.bool).tril()
        mask[r, 0, len(rows_ids[r]) :, 0] = True  # padding queries see something: no NaN in softmax
    return out.micro_batch(
        rows_ids,
        position_ids=torch.tensor([r + [0] * (width - len(r)) for r in rows_pos], dtype=torch.long),
        attention_mask=mask,
        num_sequences=sum(len(u) for u in units),
    )


def _micro_batch(seqs: list[Trajectory], weights: list[float], layout: str) -> MicroBatch:
    rows_ids: list[list[int]] = []
    pos_ids: list[int] = []
    out = _Completions()
    for s, sw in zip(seqs, weights, strict=True):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        if layout == "packed":
            off = len(pos_ids)
            pos_ids += range(p + c)
            if not rows_ids:
                rows_ids.append([])
            rows_ids[0] += s.prompt_ids + s.completion_ids
            row = 0
        else:
            off = 0
            rows_ids.append(s.prompt_ids + s.completion_ids)
            row = len(rows_ids) - 1
        out.add(s, sw, row, range(off + p - 1, off + p + c - 1))
    width = max(len(r) for r in rows_ids)
    padded = any(len(r) != width for r in rows_ids)
    mask = (
        torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows_ids], dtype=torch.long)
        if padded
        else None
    )
    return out.micro_batch(
        rows_ids,
        position_ids=torch.tensor([pos_ids], dtype=torch.long) if layout == "packed" else None,
        attention_mask=mask,
        num_sequences=len(seqs),
    )


def dummy_micro_batch() -> MicroBatch:
    """A zero-weight micro-batch for a rank with fewer micro-batches than the others (collectives
    in FSDP/DDP need the same number of forward/backward passes on every rank)."""
    return MicroBatch(
        input_ids=torch.zeros((1, 2), dtype=torch.long),
        position_ids=None,
        attention_mask=None,
        logit_index=torch.zeros(1, dtype=torch.long),
        rows=torch.zeros(1, dtype=torch.long),
        cols=torch.zeros(1, dtype=torch.long),
        targets=torch.zeros(1, dtype=torch.long),
        inference_logp=torch.zeros(1),
        advantages=torch.zeros(1),
        weights=torch.zeros(1),
        num_tokens=0,
        num_sequences=0,
    )
