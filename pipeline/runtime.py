"""Device and numerics, resolved once in a stage's main and passed down as a Runtime."""

from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import PipelineError

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters (malloc.h)
GPU_DATA_FRACTION = 0.5  # keep the uint8 data on the GPU when it takes at most this share of free memory


@dataclass(frozen=True)
class Runtime:
    """Where and in which numerics a stage computes."""

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
    bf16 autocast where the GPU supports it, else fp16 with a grad scaler; on the CPU, bf16 where
    the CPU runs it natively (docs/benchmarks.md has the measurements), else fp32."""
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
        torch.set_num_threads(cpu_threads())
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and dev.type == "cpu":
        raise PipelineError("train.precision=fp16 needs CUDA; use fp32 or bf16 on the CPU")
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    # channels_last pays on both: tensor cores on CUDA, oneDNN's blocked convolutions on the CPU.
    return Runtime(device=dev, amp_dtype=amp, channels_last=True)


THREADS_ENV = "PIPELINE_THREADS"


def cpu_threads() -> int:
    """PIPELINE_THREADS, else the cores shared among this machine's processes of a DDP run."""
    wanted = os.environ.get(THREADS_ENV, "")
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise PipelineError(f"{THREADS_ENV}={wanted!r}: expected a number of threads >= 1")
        return int(wanted)
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    PyTorch's CPU allocator caches nothing: every batch mallocs its multi-MiB activations and
    gradients again, and with glibc's defaults many are fresh mmaps whose pages fault in, zeroed, on
    every batch. Raising the mmap and trim thresholds turns that into reuse (docs/benchmarks.md).
    Peak RSS stays the training step's working set. Process-wide and permanent, so only stages
    that train or evaluate set it."""
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
