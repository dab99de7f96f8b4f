"""torch.distributed through DeepSpeed, and the small collectives the loop uses to agree across ranks."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_rank0() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed once: gloo on CPU, nccl on CUDA.

    Without a launcher (no RANK/WORLD_SIZE), runs as a world of one on a free local port. Under a bare
    `srun` (no torchrun/deepspeed launcher), SLURM's task ids are mapped when MASTER_ADDR is set.
    """
    if torch.distributed.is_initialized():
        return
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env.get("SLURM_NTASKS", "1"),
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    if env.get("WORLD_SIZE", "1") == "1":
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            env.setdefault(k, v)
        env.setdefault("MASTER_PORT", str(free_port()))
    # JIT-built ops land in one reusable cache instead of torch's default per-user dir.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dalle_ar" / "torch_extensions"))

    import deepspeed  # heavy: imported on the first training call, not by `dalle-ar --help`
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    # torch flags the collectives DeepSpeed's ZeRO calls every step; not ours to fix.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)

    cpu = get_accelerator().device_name() == "cpu"
    if not cpu and torch.cuda.is_available():  # before any collective: rank k's NCCL traffic on GPU k, not GPU 0
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    if cpu and env.get("DALLE_AR_SHM_COMM", "0") != "1":
        # DeepSpeed JIT-compiles a shared-memory all-reduce at every init on CPU that only inference
        # tensor-parallelism uses. Marking it incompatible skips the build; gloo does the training comms.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", verbose=False)


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group."""
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _small_tensor(values: list, dtype) -> torch.Tensor:
    """A tensor for a control collective: NCCL reduces only CUDA tensors (on the rank's own GPU)."""
    return torch.tensor(values, dtype=dtype, device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")


def all_true(flag: bool, world: int) -> bool:
    """True only if `flag` is True on every rank (every rank gets the same answer)."""
    if world == 1:
        return flag
    t = _small_tensor([1 if flag else 0], torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def sum_dicts(d: dict, world: int) -> dict:
    """Add up {name: count} over ranks (keys may differ between ranks)."""
    if world == 1:
        return dict(d)
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, dict(d))
    total = {}
    for part in everyone:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def mean_over_ranks(values: dict, world: int) -> dict:
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = _small_tensor([values[k] for k in keys], torch.float64)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, (t / world).tolist()))
