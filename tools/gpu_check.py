"""`make gpu-check`: on a machine with a CUDA GPU, run everything this project has written for CUDA, in a
few minutes, and write reports/gpu_check.json; exit 1 on any failure. Without a GPU it says so, writes
that, and exits 0.

1. tests/test_cuda.py: autocast (bf16, fp16 with the grad scaler), channels_last, data on the GPU or
   pinned, cudnn.benchmark;
2. DDP over nccl: a 2-process train (train.nproc 2) where there are 2 GPUs, else 1 process;
3. a short digits training, and food3 when ../shared/data/food3.zip is there: test accuracy;
4. `make bench`'s CUDA variants of the training loop (fp32 / amp, with and without channels_last).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from tools.checkout import ROOT, copy_checkout

REPORT = Path("reports/gpu_check.json")
FOOD3 = ROOT.parent / "shared" / "data" / "food3.zip"


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> dict:
    began = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        out = {"ok": proc.returncode == 0, "exit": proc.returncode, "tail": (proc.stdout + proc.stderr)[-1500:]}
    except subprocess.TimeoutExpired:
        out = {"ok": False, "exit": None, "tail": f"timed out after {timeout} s"}
    out["seconds"] = round(time.monotonic() - began, 1)
    return out


def _project(tmp: Path, name: str, params: dict) -> tuple[Path, dict]:
    """A copy of the checkout with `params` ({"section": {"key": value}}) over the committed ones."""
    root = tmp / name
    text = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True).stdout
    values = yaml.safe_load(text or (ROOT / "params.yaml").read_text())
    for section, keys in params.items():
        values[section].update(keys)
    copy_checkout(root, yaml.safe_dump(values, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    return root, env


def _training(tmp: Path, name: str, params: dict, timeout: float) -> dict:
    root, env = _project(tmp, name, params)
    steps = {}
    for stage in ("fetch_data", "prepare", "train", "evaluate"):
        steps[stage] = _run([sys.executable, "-m", f"pipeline.{stage}"], root, env, timeout)
        if not steps[stage]["ok"]:
            return {"ok": False, "steps": steps}
    metrics = json.loads((root / "reports/metrics.json").read_text())
    train = json.loads((root / "reports/train.json").read_text())
    return {"ok": True, "test_accuracy": metrics["accuracy"], "train_stage_seconds": round(train["stage_seconds"], 1),
            "steps": {k: v["seconds"] for k, v in steps.items()}}


def check(tmp: Path) -> dict:
    gpus = torch.cuda.device_count()
    result: dict = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__,
                    "cuda": torch.version.cuda}
    result["cuda_tests"] = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 str(ROOT / "tests/test_cuda.py")], ROOT, {**os.environ, "PYTHONPATH": str(ROOT)}, 120)
    fast = {"prepare": {"image_size": 32}, "train": {"epochs": 8, "patience": 8}, "base": {"device": "cuda"}}
    result["ddp_nccl"] = _training(tmp, "ddp", {**fast, "train": {**fast["train"], "nproc": min(gpus, 2)}}, 180)
    result["ddp_nccl"]["processes"] = min(gpus, 2)
    result["digits"] = _training(tmp, "digits", fast, 120)
    if FOOD3.exists():
        result["food3"] = _training(tmp, "food3", {
            "data": {"source": str(FOOD3)}, "base": {"device": "cuda"},
            "prepare": {"image_size": 64, "channels": 3},
            "train": {"hidden_units": 32, "batch_size": 32, "lr": 0.001, "dropout": 0.3, "epochs": 40, "patience": 1000,
                      "augment": ["flip", "resized_crop", "trivialaugment"], "monitor": "val_acc",
                      "label_smoothing": 0.1}}, 180)
    result["bench_cuda"] = _bench_variants(tmp)
    return result


def _bench_variants(tmp: Path) -> dict:
    """images/s of the pipeline's loop on the GPU: fp32 / amp, NCHW / channels_last (tools.bench)."""
    from pipeline.config import load_params
    from tools.bench import pipeline_loop

    root, env = _project(tmp, "bench", {"base": {"device": "cuda"}})
    for stage in ("fetch_data", "prepare"):
        if not _run([sys.executable, "-m", f"pipeline.{stage}"], root, env, 120)["ok"]:
            return {"ok": False}
    params = load_params(root / "params.yaml")
    out = {"ok": True}
    for name, precision, channels_last in (("fp32", "fp32", False), ("fp32+channels_last", "fp32", True),
                                           ("amp", "auto", False), ("amp+channels_last", "auto", True)):
        rates, _ = pipeline_loop(root, params, 3, precision, channels_last)
        out[name] = round(statistics.median(rates), 1)
    return out


def failed(result: dict) -> list[str]:
    return [k for k, v in result.items() if isinstance(v, dict) and v.get("ok") is False]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        result = {"gpu": None, "skipped": "no CUDA device here (torch.cuda.is_available() is False)"}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"gpu-check skipped: {result['skipped']}")
        return 0
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        result = check(Path(tmp))
    result["seconds"] = round(time.monotonic() - began, 1)
    result["failed"] = failed(result)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
