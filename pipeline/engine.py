"""The one engine: `train_one_epoch` and `evaluate`, used by train, evaluate and the benchmark.

Data are whole uint8 tensors (N, C, H, W) sliced into batches in place: no DataLoader workers, no
per-image decoding. On CUDA the uint8 tensor lives on the GPU when it fits (4x smaller than float),
otherwise in pinned memory with non_blocking copies. Losses and correct counts are summed on the
device and read once per epoch, so there is no per-batch `.item()` sync.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from tqdm import tqdm

from pipeline import distributed
from pipeline.config import PipelineError
from pipeline.transforms import Transform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters (malloc.h)
GPU_DATA_FRACTION = 0.5  # keep the uint8 data on the GPU when it takes at most this share of free memory


@dataclass(frozen=True)
class Runtime:
    """Device and numerics, resolved once in a stage's main and passed down."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for fp32
    channels_last: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)


def resolve_runtime(device: str, precision: str) -> Runtime:
    """base.device and train.precision -> Runtime. `auto` picks CUDA when present and, on CUDA,
    bf16 autocast where the GPU supports it, else fp16 with a grad scaler; fp32 on the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PipelineError(f"base.device={device}: CUDA is not available on this machine")
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PipelineError(f"base.device={device}: only {torch.cuda.device_count()} CUDA device(s)")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device("cpu")
        keep_freed_memory()
        # the cores, shared among the processes of a DDP run on this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:  # measured: bf16 autocast ~1.7x fp32 (2.4x with channels_last) with AMX, and
            # ~1.75x (2.1-2.3x) on an AMD EPYC with AVX512-BF16 and no AMX
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and dev.type == "cpu":
        raise PipelineError("train.precision=fp16 needs CUDA; use fp32 or bf16 on the CPU")
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    # channels_last pays on both: tensor cores on CUDA, oneDNN's blocked convolutions on the CPU.
    return Runtime(device=dev, amp_dtype=amp, channels_last=True)


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    PyTorch's CPU allocator caches nothing: every batch mallocs its multi-MiB activations and
    gradients again. With glibc's defaults many of them are fresh mmaps (or heap tops trimmed on
    free), so their pages fault in, zeroed, on every batch. Raising the mmap and trim thresholds
    turns that into reuse. Measured on the 2-core Intel bench machine (TinyVGG on digits, bf16, interleaved
    runs): 1,783-1,854 images/s without, 2,058-2,106 with. In an earlier, faster hour: both settings
    2,300-2,400, the mmap threshold alone 2,130, the trim threshold alone 1,160 (setting it also stops
    glibc from raising its mmap threshold by itself). Peak RSS stays the training step's working set.
    Process-wide and permanent, so only stages that train or evaluate set it."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls/convs run natively instead of being emulated (slower)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so probe for them
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def place(images: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Where a split's uint8 tensor lives during training: on the GPU when it fits, else pinned."""
    if not rt.cuda:
        return images
    free, _ = torch.cuda.mem_get_info(rt.device)
    if images.numel() <= GPU_DATA_FRACTION * free:
        return images.to(rt.device)
    return images.pin_memory()


def prepare_model(model: nn.Module, rt: Runtime) -> nn.Module:
    model = model.to(rt.device)
    return model.to(memory_format=torch.channels_last) if rt.channels_last else model


def _batch(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, rt: Runtime):
    x = images[idx.to(images.device)].to(rt.device, non_blocking=True)
    y = labels[idx.to(labels.device)].to(rt.device, non_blocking=True)
    return x, y


def train_one_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, transform: Transform,
                    optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                    loss_fn: nn.Module, batch_size: int, generator: torch.Generator, rt: Runtime,
                    num_classes: int, desc: str = "train") -> dict[str, float]:
    """One pass over the training split in a random order drawn from `generator`.

    The model must already be in train mode (see models.set_train_mode). Returns train_loss (mean
    per image), train_acc (per image over the split), images_per_second and epoch_seconds; under
    DDP each rank trains on its shard and the numbers are over all ranks.
    """
    start = time.perf_counter()
    order = distributed.shard(torch.randperm(len(images), generator=generator))
    total_loss = torch.zeros((), device=rt.device)
    acc = MulticlassAccuracy(num_classes=num_classes, average="micro").to(rt.device)
    batches = range(0, len(order), batch_size)
    for i in tqdm(batches, desc=desc, leave=False, disable=not sys.stderr.isatty()):
        x, y = _batch(images, labels, order[i:i + batch_size], rt)
        x = transform(x)
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            logits = model(x)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.detach() * len(y)
        acc.update(logits.detach(), y)
    seen = distributed.all_sum(torch.tensor([float(len(order))], device=rt.device)).item()
    total_loss = distributed.all_sum(total_loss)
    train_acc = acc.compute().item()  # torchmetrics syncs its counts across ranks itself
    seconds = time.perf_counter() - start
    return {
        "train_loss": total_loss.item() / seen,
        "train_acc": train_acc,
        "epoch_seconds": seconds,
        "images_per_second": seen / seconds,
    }


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, transform: Transform, batch_size: int,
                   rt: Runtime) -> torch.Tensor:
    """Logits (float32, on the CPU) for every image, in order. The model must be in eval mode."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(rt.device, non_blocking=True)
        x = transform(x)
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            out.append(model(x).float())
    return torch.cat(out).cpu() if out else torch.empty(0)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, transform: Transform,
             batch_size: int, rt: Runtime, num_classes: int, prefix: str = "val") -> dict[str, float]:
    """Mean cross-entropy per image and per-image accuracy over a whole split."""
    was_training = model.training
    model.eval()
    logits = predict_logits(model, images, transform, batch_size, rt)
    model.train(was_training)
    targets = labels.cpu()
    acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
    return {
        f"{prefix}_loss": F.cross_entropy(logits, targets).item(),
        f"{prefix}_acc": acc(logits, targets).item(),
    }
