"""Trainer throughput: offbeat's batching, packing and loss against a plain PyTorch loop.

offbeat: scored trajectories (protobuf) -> `Trajectory.from_scored` -> `GroupBuffer.take_step`
(groups, staleness, advantages) -> `TrainCore.step` (first-fit packing by token budget with
position-id resets, temperature-scaled log-probs only at completion positions, IcePop loss,
AdamW, clipping). Plain: the same trajectories padded into one [B, Lmax] batch with an attention
mask, full logits, `-(A * logp)` over completion tokens, AdamW, clipping. Same tiny Qwen2 model
and initialisation, same batches (long-tailed completion lengths), alternated rounds; tokens are
real (non-pad) prompt + completion tokens; each batch is run by both back to back
(order alternating) and the figures are medians over those pairs (the ratio: median of pair ratios).

Last line: {"offbeat_tokens_per_s", "plain_tokens_per_s", "ratio"}; goal ratio >= 0.9.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import torch
from offbeat_trainer.batching import GroupBuffer, Trajectory
from offbeat_trainer.config import TrainerConfig
from offbeat_trainer.train import CoreSettings, TrainCore, load_model

from offbeat.tinymodel import build_tiny_model
from offbeat.v1 import rollout_pb2

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
ROUNDS = 4
BUDGET = int(sys.argv[2]) if len(sys.argv) > 2 else TrainerConfig().micro_batch_tokens
GROUPS, GROUP_SIZE = 4, 8


def make_batch(step: int) -> list[rollout_pb2.ScoredTrajectory]:
    g = torch.Generator().manual_seed(step)
    out = []
    for k in range(GROUPS):
        prompt = torch.randint(5, 250, (int(torch.randint(16, 64, (1,), generator=g)),), generator=g).tolist()
        for i in range(GROUP_SIZE):
            # long-tailed: most completions short, a few long
            c = int(16 + torch.empty(1).exponential_(1 / 48, generator=g).clamp(max=400))
            comp = torch.randint(5, 250, (c,), generator=g).tolist()
            out.append(
                rollout_pb2.ScoredTrajectory(
                    completion=rollout_pb2.RolloutCompletion(
                        trajectory_id=f"s{step}-g{k}-{i}",
                        group_id=f"s{step}-g{k}",
                        group_size=GROUP_SIZE,
                        prompt_token_ids=prompt,
                        completion_token_ids=comp,
                        logprobs=[-5.5] * c,
                        version_spans=[rollout_pb2.VersionSpan(version=0, start=0, end=c)],
                    ),
                    reward=float(torch.rand(1, generator=g).round()),
                    status=rollout_pb2.REWARD_STATUS_OK,
                )
            )
    return out


def offbeat_step(core: TrainCore, msgs: list[rollout_pb2.ScoredTrajectory]) -> int:
    buf = GroupBuffer()
    for m in msgs:
        buf.add(Trajectory.from_scored(m))
    batch = buf.take_step(
        step=0,
        version_steps={0: 0},
        max_staleness=2,
        groups_per_step=GROUPS,
        std_normalize=False,
        filter_zero_advantage=False,
    )
    assert len(batch.samples) == len(msgs)
    core.step(batch.samples)
    return sum(t.num_tokens for t in batch.samples)


def plain_step(model, opt, msgs: list[rollout_pb2.ScoredTrajectory]) -> int:  # type: ignore[no-untyped-def]
    seqs, masks, advs = [], [], []
    by_group: dict[str, list[float]] = {}
    for m in msgs:
        by_group.setdefault(m.completion.group_id, []).append(m.reward)
    for m in msgs:
        c = m.completion
        rewards = by_group[c.group_id]
        seqs.append(list(c.prompt_token_ids) + list(c.completion_token_ids))
        masks.append([0] * len(c.prompt_token_ids) + [1] * len(c.completion_token_ids))
        advs.append(m.reward - sum(rewards) / len(rewards))
    L = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (L - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    loss_mask = torch.tensor([mk + [0] * (L - len(mk)) for mk in masks], dtype=torch.float32)[:, 1:]
    adv = torch.tensor(advs)[:, None]
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = -(adv * logp * loss_mask).sum() / loss_mask.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return sum(len(s) for s in seqs)


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(tmp, hidden_size=128, layers=4)
        core = TrainCore(load_model(str(path)), CoreSettings(lr=1e-4, micro_batch_tokens=BUDGET))
        plain = load_model(str(path))
        plain.train()
        opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)
        batches = [make_batch(s) for s in range(STEPS)]
        offbeat_step(core, batches[0])  # warm-up both
        plain_step(plain, opt, batches[0])
        pairs: list[tuple[float, float]] = []  # (offbeat tok/s, plain tok/s) measured back to back
        for r in range(ROUNDS):
            for i, b in enumerate(batches):
                order = ["offbeat", "plain"] if (r + i) % 2 == 0 else ["plain", "offbeat"]
                rate = {}
                for name in order:
                    started = time.perf_counter()
                    tokens = offbeat_step(core, b) if name == "offbeat" else plain_step(plain, opt, b)
                    rate[name] = tokens / (time.perf_counter() - started)
                pairs.append((rate["offbeat"], rate["plain"]))
            print(f"round {r}: pairs {[(round(a), round(b)) for a, b in pairs[-len(batches) :]]}", flush=True)
    ob = statistics.median(p[0] for p in pairs)
    pl = statistics.median(p[1] for p in pairs)
    ratio = statistics.median(p[0] / p[1] for p in pairs)
    print(
        json.dumps(
            {
                "offbeat_tokens_per_s": round(ob, 1),
                "plain_tokens_per_s": round(pl, 1),
                "ratio": round(ratio, 3),
                "micro_batch_tokens": BUDGET,
            }
        )
    )


if __name__ == "__main__":
    main()
