"""One run over several processes, in the environment torchrun sets.

A multi-GPU run is one process per GPU (or per CPU slot), started by the runner, by
`torchrun`, or by Slurm, with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in
the environment. `init()` joins their process group: NCCL on GPUs, gloo on CPUs (how the
tests run DDP on a machine without a GPU). Without those variables a run is one process,
`init()` returns a world of one and every helper here does nothing, so the single-process
path is the same code.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Rank 0 alone runs COCOeval while the others wait in the next collective: on val2017 that
# can take minutes, far inside this limit; a hung peer is reported after it.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes the run dir (metrics, status, checkpoints)."""
        return self.rank == 0


def from_env() -> World:
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                 int(env.get("LOCAL_RANK", 0)))


def init(device_type: str) -> World:
    """Join the run's process group (once); a single process joins none."""
    world = from_env()
    if world.size > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=TIMEOUT)
    return world


def join_run(spec, device: str):
    """(World, torch.device) of this process of run `spec`: its process group joined, its
    GPU picked by local rank; one line when the launch does not match the run's gpus."""
    device = torch.device(device)
    world = init(device.type)
    if world.size != spec.gpus:
        raise ValueError(f"{spec.run_id} asks for gpus={spec.gpus} but runs in {world.size} "
                         f"process(es); start it with `bench run` (one process per GPU) or "
                         f"torchrun --nproc-per-node={spec.gpus}")
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    return world, device


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean(values: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of `values` over the processes (each holds the same shape)."""
    if world.size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world.size


def gather(items: list, world: World):
    """Every process's list, concatenated in rank order, on rank 0 (None elsewhere)."""
    if world.size == 1:
        return items
    out = [None] * world.size if world.main else None
    dist.gather_object(items, out, dst=0)
    return [x for part in out for x in part] if world.main else None


def broadcast_buffers(module, world: World):
    """Rank 0's buffers (e.g. BN running statistics) on every process."""
    if world.size > 1:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def barrier(world: World):
    if world.size > 1:
        dist.barrier()
