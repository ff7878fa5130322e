"""Data-parallel training under torchrun on fixed synthetic batches, for tests and benchmarks.

`torchrun --nproc-per-node N -m offbeat_trainer.distributed --model DIR --out FILE` (or plain
`python -m ...` for one process) initialises the process group (gloo on CPU, NCCL on CUDA),
builds `TrainCore` (FSDP2 `fully_shard` or DDP over the ranks), trains `--steps` steps on
deterministic synthetic groups that every rank generates identically, and rank 0 writes the full
parameters to a safetensors file (gathered as a light checkpoint gathers them, and checked equal
to what the full state dict, optimizer included, gathers). Equal files from 1 and N processes
show the data-parallel path computes the same update.

Not covered: reading from the bus (the service trains in one process).
"""

from __future__ import annotations

import argparse
import os


def synthetic_batch(step: int, *, groups: int, group_size: int, seed: int = 0) -> list:  # type: ignore[type-arg]
    import torch

    from offbeat_trainer.batching import Trajectory, group_advantages

    g = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for k in range(groups):
        rewards = torch.rand(group_size, generator=g).round().tolist()
        adv = group_advantages(rewards, std_normalize=False)
        for i in range(group_size):
            p = int(torch.randint(4, 24, (1,), generator=g))
            c = int(torch.randint(2, 40, (1,), generator=g))
            prompt = torch.randint(5, 250, (p,), generator=g).tolist()
            completion = torch.randint(5, 250, (c,), generator=g).tolist()
            logprobs = (-5.5 + 0.3 * torch.randn(c, generator=g)).tolist()
            out.append(
                Trajectory(
                    f"s{step}-g{k}-{i}",
                    f"s{step}-g{k}",
                    group_size,
                    prompt,
                    completion,
                    logprobs,
                    rewards[i],
                    "ok",
                    0,
                    advantage=adv[i],
                )
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="offbeat_trainer.distributed", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--out", required=True, help="safetensors file for the final parameters (rank 0)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--micro-batch-tokens", type=int, default=256)
    parser.add_argument("--parallel", default="auto", choices=["auto", "fsdp", "ddp"])
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from offbeat_trainer.checkpoint import save_weights
    from offbeat_trainer.train import CoreSettings, TrainCore, load_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if world > 1:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(0)
    model = load_model(args.model)
    core = TrainCore(
        model,
        CoreSettings(lr=args.lr, micro_batch_tokens=args.micro_batch_tokens, parallel=args.parallel),
        device=device,
    )
    for step in range(args.steps):
        metrics = core.step(synthetic_batch(step, groups=args.groups, group_size=args.group_size))
        if core.rank == 0:
            print(
                f"step {step + 1} wrapper={core.wrapper} world={core.world} "
                f"loss={metrics['loss']:.6f} micro_batches={int(metrics['micro_batches'])}",
                flush=True,
            )
    model_sd = core.model_state()  # what a light checkpoint gathers: the model without the optimizer
    full_sd, _ = core.full_state()
    if core.rank == 0:
        from pathlib import Path

        assert model_sd.keys() == full_sd.keys() and all(
            torch.equal(model_sd[k], full_sd[k]) for k in model_sd
        )
        save_weights(model_sd, Path(args.out))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
