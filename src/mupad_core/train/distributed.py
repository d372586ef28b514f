"""One process or many under torchrun: the process group, gradient averaging, barriers.
Everything else in a run is the same code for 1 or N processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Process:
    """Where this process sits in a (possibly distributed) run."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_process(device: str = "auto") -> Process:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Process(rank, world, dev)


def mean_over_processes(record: dict[str, float], process: Process) -> dict[str, float]:
    if process.world == 1:
        return record
    keys = sorted(k for k in record if k.startswith("loss_"))
    values = torch.tensor([record[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {**record, **{k: float(v) / process.world for k, v in zip(keys, values)}}


def average_grads(modules, process: Process) -> None:
    """Trainable condition encoders run outside the DDP wrapper (the batch maker calls
    them); their gradients are averaged here, as DDP does for the denoiser's."""
    for module in modules:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= process.world


def barrier(process: Process) -> None:
    if process.world > 1:
        dist.barrier()
