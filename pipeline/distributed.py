"""Multi-process training: `train.nproc > 1` re-runs the train stage under torchrun with
DistributedDataParallel (gloo on the CPU, nccl on CUDA). Rank 0 alone talks to MLflow and writes
checkpoints and outputs; every rank takes its shard of each epoch's shuffled order.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist


def rank() -> int:
    """This process's rank: from the process group, or torchrun's RANK before joining it."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True inside a torchrun worker (torchrun sets LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def relaunch(nproc: int, module: str, argv: list[str]) -> int:
    """Run `python -m module argv...` as `nproc` torchrun workers on this machine; their exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM here: torchrun passes SIGTERM on to its workers
        proc.terminate()
        proc.wait(timeout=60)
        raise


def init(device: torch.device) -> torch.device:
    """Join the process group; on CUDA each rank takes GPU LOCAL_RANK. Returns the rank's device."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shard(order: torch.Tensor) -> torch.Tensor:
    """This rank's part of an epoch's order: every rank gets the same number of samples (the last
    len % world are dropped, as DistributedSampler(drop_last=True)), so all run the same batches."""
    n = world_size()
    if n == 1:
        return order
    return order[: len(order) - len(order) % n][rank()::n]


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, returned); a no-op in one process."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (decisions that must agree, such as early stopping)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
