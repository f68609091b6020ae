"""Multi-process training: `train.nproc > 1` re-runs the train stage under torchrun with
DistributedDataParallel (gloo on the CPU, nccl on CUDA), on this machine or, with PIPELINE_NNODES,
on several, which meet at PIPELINE_RDZV_ENDPOINT (torchrun's c10d rendezvous). Rank 0 alone talks to
MLflow and writes checkpoints and outputs; every rank takes its shard of each epoch's shuffled order.
A stage started by torchrun itself (a cluster scheduler's command) runs as it is.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import PipelineError


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


NODES_ENV, ENDPOINT_ENV, JOB_ENV = "PIPELINE_NNODES", "PIPELINE_RDZV_ENDPOINT", "PIPELINE_RDZV_ID"


@dataclass(frozen=True)
class Nodes:
    """The machines a training job spans, from the environment (they are where it runs, not what it
    computes: the run records them, the params do not)."""

    count: int  # PIPELINE_NNODES, default 1
    endpoint: str | None  # PIPELINE_RDZV_ENDPOINT, host:port of the rendezvous (one of the nodes)
    job: str  # PIPELINE_RDZV_ID: the nodes of one job share it

    @classmethod
    def from_env(cls, env=os.environ) -> "Nodes":
        text = env.get(NODES_ENV, "1")
        if not text.isdigit() or int(text) < 1:
            raise PipelineError(f"{NODES_ENV}={text!r}: expected a number of nodes >= 1")
        count, endpoint = int(text), env.get(ENDPOINT_ENV) or None
        if count > 1 and not endpoint:
            raise PipelineError(f"{NODES_ENV}={count} needs {ENDPOINT_ENV}=host:port, the rendezvous every node "
                                "reaches (one of them)")
        return cls(count, endpoint, env.get(JOB_ENV, "pipeline-train"))

    def torchrun_args(self) -> list[str]:
        if self.count == 1:
            return ["--standalone"]
        return ["--nnodes", str(self.count), "--rdzv-backend", "c10d", "--rdzv-endpoint", self.endpoint,
                "--rdzv-id", self.job]


def relaunch(nproc: int, nodes: Nodes, module: str, argv: list[str]) -> int:
    """Run `python -m module argv...` as `nproc` torchrun workers on this machine, of a job over
    `nodes`; their exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *nodes.torchrun_args(), f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    proc = subprocess.Popen(cmd, preexec_fn=die_with_parent)
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM here: torchrun passes SIGTERM on to its workers
        proc.terminate()
        proc.wait(timeout=60)
        raise


def die_with_parent() -> None:
    """Linux: have the kernel send this process SIGTERM when its parent dies. torchrun starts each
    worker in a session of its own, so after a `kill -9` of the stage and torchrun, orphaned workers
    would train on, and rank 0 would finish the run and delete the checkpoint the re-run should resume
    from. SIGTERM, not SIGKILL: rank 0 then marks its MLflow run KILLED."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG


def launcher_alive() -> bool:
    """Inside a torchrun worker: whether its parent is still torchrun. A launcher that died before
    die_with_parent() ran (a worker's imports take seconds) sent no signal: the worker was re-parented."""
    try:
        cmdline = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:  # not Linux: nothing to check
        return True
    return b"torchrun" in cmdline or b"torch.distributed.run" in cmdline


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, whose gradient is again the sum over ranks. Synchronous: torch's own
    torch.distributed.nn.functional.all_reduce (deprecated) aborted a rank at exit now and then."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over all ranks' samples, for DDP on the CPU, where
    nn.SyncBatchNorm refuses to run ("only work with GPU modules"). Per-channel sums, sums of
    squares and counts are all-reduced by _AllReduceSum, whose backward sums the gradients over
    ranks, as nn.SyncBatchNorm's own backward does. Same parameters and buffers as
    BatchNorm2d, so state dicts load into the plain model. Outside training: plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()  # statistics in fp32 under bf16 autocast
        local = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)),
                           xf.new_full((1,), float(x.numel() // c))])
        total = _AllReduceSum.apply(local)
        count = total[-1]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean * mean).clamp(min=0)  # biased, as batch norm normalises
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(var * count / (count - 1), alpha=factor)  # unbiased, as BatchNorm2d


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm2d replaced by a synchronised one: nn.SyncBatchNorm on CUDA,
    CPUSyncBatchNorm on the CPU (weights and running statistics kept)."""
    if any(p.is_cuda for p in module.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            sync.requires_grad_(any(p.requires_grad for p in child.parameters()))
            setattr(module, name, sync)
        else:
            _convert_cpu(child)
    return module


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
