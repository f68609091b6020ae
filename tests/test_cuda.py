"""The CUDA paths, on a CUDA device: autocast (bf16, fp16 with the grad scaler), channels_last, the data
kept on the GPU or in pinned memory, cudnn.benchmark. Skipped without CUDA; `make gpu-check` runs them
where there is a GPU."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.training import toy_epoch

from pipeline import runtime
from pipeline.runtime import Runtime, place, resolve_runtime

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)")


def epoch(rt: Runtime):
    return toy_epoch(rt, n=64, size=16, hidden=8, batch=16)


def test_auto_picks_cuda_with_mixed_precision_and_cudnn_benchmark():
    rt = resolve_runtime("auto", "auto")
    assert rt.cuda and rt.channels_last and torch.backends.cudnn.benchmark
    assert rt.amp_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_an_epoch_in_each_precision(precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    rt = resolve_runtime("cuda", precision)
    net, before, m, learner = epoch(rt)
    assert learner.scaler.is_enabled() == (precision == "fp16")  # loss scaling for fp16 only
    assert all(math.isfinite(m[k]) for k in ("train_loss", "train_acc", "val_loss", "val_acc"))
    after = net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # weights stay fp32 under autocast
    first = next(p for p in net.parameters() if p.dim() == 4)
    assert first.is_cuda and first.is_contiguous(memory_format=torch.channels_last)


def test_data_on_the_gpu_when_it_fits_else_pinned(monkeypatch):
    rt = resolve_runtime("cuda", "fp32")
    x = torch.zeros(8, 1, 16, 16, dtype=torch.uint8)
    assert place(x, rt).is_cuda
    monkeypatch.setattr(runtime, "GPU_DATA_FRACTION", 0.0)
    placed = place(x, rt)
    assert not placed.is_cuda and placed.is_pinned()


def test_cuda_and_cpu_agree_in_fp32():
    cpu = Runtime(torch.device("cpu"), None, False)
    cuda = resolve_runtime("cuda", "fp32")
    a, b = epoch(cpu)[2], epoch(cuda)[2]
    for key in ("train_loss", "val_loss"):
        assert a[key] == pytest.approx(b[key], rel=2e-2), key  # TF32 matmuls on CUDA (resolve_runtime)

