"""tools.memwatch's memory high-water marks, `python -m tools.bench --scale N` end to end, and the
loop ceiling's count of convolution FLOPs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers.project import REPO, committed
from pipeline.models import build_model
from pipeline.runtime import Runtime
from tools.bench import conv_ceiling

# Allocates 200 MiB of heap in a child process, then 50 MiB in its own.
HOG = """
import multiprocessing, time

def hog():
    block = bytearray(200 * 2**20)
    time.sleep(0.5)

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=hog)
    p.start()
    p.join()
    block = bytearray(50 * 2**20)
    time.sleep(0.2)
"""


def marks(stdout: str) -> dict[str, float]:
    return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in stdout.splitlines()
            if line.startswith(("VmHWM:", "TreeAnonHWM:"))}


def test_memwatch_counts_child_processes(tmp_path):
    (tmp_path / "hog.py").write_text(HOG)
    proc = subprocess.run([sys.executable, "-m", "tools.memwatch", "hog"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": f"{REPO}:{tmp_path}", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    m = marks(proc.stdout)
    assert 200 <= m["TreeAnonHWM"] < 400  # the child's 200 MiB, sampled while it lived
    assert 50 <= m["VmHWM"] < 200  # the process's own 50 MiB, not its child's


def test_bench_scale_reports_fetch_and_prepare(tmp_path):
    (tmp_path / "params.yaml").write_text(committed("params.yaml"))  # bench runs in a project folder, like the stages
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "--scale", "3000"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "reports/bench_scale.json").read_text())
    small, large = result["images"]["300"], result["images"]["3000"]
    # 32 px RGB uint8 images, all of them in the train, val and test files (+ their CSVs and meta.json)
    assert 3000 * 32 * 32 * 3 / 2**20 <= large["prepared_output_mib"] < 10
    for figures in (small, large):
        assert figures["prepare_images_per_second"] > 0 and figures["fetch_seconds"] > 0
        assert 10 < figures["prepare_peak_anon_mib_with_workers"] < 1000


def test_conv_ceiling_counts_every_convolution_of_the_model():
    model = build_model("tinyvgg", 10, 1, 16, hidden_units=8, batch_norm=True, dropout=0.0)
    rt = Runtime(torch.device("cpu"), None, False)
    result = conv_ceiling(model, torch.rand(4, 1, 16, 16), rt, repeats=1)
    # 4 images; outputs of 8 channels at 16x16 (two convs) and 8x8 (two); 2 FLOPs per multiply-add.
    # The first conv (1 input channel) has no input gradient: forward + weight gradient only.
    first = 4 * 8 * 16 * 16 * (1 * 9) * 2 * 2
    rest = 4 * 8 * (16 * 16 + 2 * 8 * 8) * (8 * 9) * 2 * 3
    assert result["conv_gflop_per_batch"] == round((first + rest) / 1e9, 6)
    assert result["conv_only_images_per_second"] > 0 and result["matmul_gflops_per_second"] > 0
    assert result["dtype"] == "float32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_check_skips_cleanly_without_a_gpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "gpu-check skipped: no CUDA device" in proc.stdout, proc.stderr
    assert json.loads(out.read_text())["gpu"] is None


def test_bench_times_batch_predict_on_a_folder_of_jpegs(eval_done):
    from pipeline.config import load_params
    from tools.bench import predict_figures

    figures = predict_figures(eval_done.root, load_params(eval_done.path("params.yaml")), n=40)
    print(figures)
    assert figures["images"] == 40
    assert 0 < figures["command_images_per_second"] < figures["loop_images_per_second"]
