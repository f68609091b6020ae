"""The train stage: early stopping, per-image metrics, runtimes, and what real runs write and record
(MLflow run, logged model, models/model.pt), reproducibility, warm starts, and how runs end when
interrupted or crashing."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers.images import make_images, noise_images
from helpers.predictions import pyfunc_probabilities
from helpers.project import (
    REPO,
    TRAIN_FAST,
    copy_prepared,
    inside_project,
    prepared_project,
)
from helpers.training import (
    EPOCH_KEYS,
    EPOCH_METRICS,
    LEARNED,
    assert_same_tensors,
    history,
    model_pt,
    rebuild,
    summary,
    toy_epoch,
    wait_for_checkpoint,
)
from torch import nn

from pipeline.dataset import load_split
from pipeline.engine import EarlyStopper, Learner, evaluate, train_one_epoch
from pipeline.errors import PipelineError
from pipeline.models import load_classifier
from pipeline.runtime import Runtime, place, resolve_runtime
from pipeline.transforms import Norm, eval_transforms

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallbacks")
GREY = Norm((0.0,), (1.0,))


def learner(model: nn.Module, opt, rt: Runtime, seed: int) -> Learner:
    return Learner(net=model, optimizer=opt, scheduler=None, scaler=rt.grad_scaler(), loss_fn=nn.CrossEntropyLoss(),
                   generator=torch.Generator().manual_seed(seed), rt=rt)


# -- EarlyStopper ---------------------------------------------------------------------------------


def stops(stopper: EarlyStopper, values) -> list[tuple[bool, bool]]:
    """(new best, should stop) after each epoch's value."""
    out = []
    for epoch, value in enumerate(values, 1):
        out.append((stopper.step(value, epoch), stopper.should_stop))
    return out


def test_early_stopper_counts_epochs_without_improvement_in_val_loss():
    s = EarlyStopper("val_loss", patience=2, min_delta=0.0)
    #           new best      new best      worse          equal: no improvement -> 2 bad epochs
    assert stops(s, [1.0, 0.8, 0.9, 0.8]) == [(True, False), (True, False), (False, False), (False, True)]
    assert (s.best, s.best_epoch) == (0.8, 2)


def test_early_stopper_resets_its_count_on_an_improvement():
    s = EarlyStopper("val_loss", patience=3, min_delta=0.0)
    assert [stop for _, stop in stops(s, [1.0, 1.1, 1.2, 0.9, 1.0, 1.0, 1.0])] == \
        [False, False, False, False, False, False, True]
    assert s.best_epoch == 4


def test_early_stopper_on_val_acc_wants_it_higher():
    s = EarlyStopper("val_acc", patience=1, min_delta=0.0)
    assert stops(s, [0.5, 0.7, 0.6]) == [(True, False), (True, False), (False, True)]
    assert (s.best, s.best_epoch) == (0.7, 2)


@pytest.mark.parametrize("monitor,values", [("val_loss", [1.0, 0.95, 0.85]), ("val_acc", [0.5, 0.55, 0.65])])
def test_early_stopper_needs_more_than_min_delta(monitor, values):
    s = EarlyStopper(monitor, patience=2, min_delta=0.1)
    # a change of 0.05 is no improvement; 0.15 from the best is
    assert stops(s, values) == [(True, False), (False, False), (True, False)]
    assert s.best_epoch == 3


def test_early_stopper_state_round_trips():
    a = EarlyStopper("val_loss", patience=2, min_delta=0.0)
    stops(a, [1.0, 0.7, 0.9])
    b = EarlyStopper("val_loss", patience=2, min_delta=0.0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert (b.best, b.best_epoch, b.bad_epochs, b.should_stop) == (0.7, 2, 1, False)
    assert b.step(0.8, 4) is False and b.should_stop


# -- per-image metrics ----------------------------------------------------------------------------


class FirstRowVote(nn.Module):
    """Logits = 10 * the first pixel row: an image whose row is one-hot at c is predicted c."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.n = num_classes
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        return x[:, 0, 0, :self.n] * self.scale


def voting_images(predicted: list[int], n: int = 3) -> torch.Tensor:
    images = torch.zeros(len(predicted), 1, 4, 4, dtype=torch.uint8)
    images[torch.arange(len(predicted)), 0, 0, torch.tensor(predicted)] = 255
    return images


# 5 images, batches of 4: the 4 in the full batch are right, the one in the short last batch is wrong.
PREDICTED = [0, 1, 2, 0, 1]
LABELS = torch.tensor([0, 1, 2, 0, 2])


def test_evaluate_accuracy_and_loss_are_per_image_over_the_split():
    model = FirstRowVote(3)
    m = evaluate(model, voting_images(PREDICTED), LABELS, eval_transforms(GREY), 4, CPU)
    # per image: 4 of 5 right = 0.8; the mean of per-batch accuracies would be (4/4 + 0/1) / 2 = 0.5
    assert m["val_acc"] == pytest.approx(0.8, abs=1e-6)
    logits = 10 * F.one_hot(torch.tensor(PREDICTED), 3).float()
    assert m["val_loss"] == pytest.approx(F.cross_entropy(logits, LABELS).item(), rel=1e-6)
    # and the mean of per-batch losses differs: (mean of 4 right + 1 wrong) / 2
    batches = (F.cross_entropy(logits[:4], LABELS[:4]).item() + F.cross_entropy(logits[4:], LABELS[4:]).item()) / 2
    assert abs(m["val_loss"] - batches) > 1


def test_train_metrics_are_per_image_over_the_split():
    model = FirstRowVote(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the predictions stay as built
    expected_loss = F.cross_entropy(10 * F.one_hot(torch.tensor(PREDICTED), 3).float(), LABELS).item()
    for seed in range(4):  # the shuffled order puts the wrong image in the full or the short batch
        m = train_one_epoch(learner(model, opt, CPU, seed), voting_images(PREDICTED), LABELS,
                            eval_transforms(GREY), 4)
        assert m["train_acc"] == pytest.approx(0.8, abs=1e-6)
        assert m["train_loss"] == pytest.approx(expected_loss, rel=1e-5)
        assert m["epoch_seconds"] > 0 and m["images_per_second"] == pytest.approx(5 / m["epoch_seconds"])


# -- runtime: device and precision ----------------------------------------------------------------


@needs_no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_a_clear_error(device):
    with pytest.raises(PipelineError, match="CUDA is not available"):
        resolve_runtime(device, "auto")


@needs_no_cuda
def test_auto_picks_the_cpu_with_bf16_only_where_it_is_native(monkeypatch):
    from pipeline import runtime

    rt = resolve_runtime("auto", "auto")
    native = runtime.cpu_has_native_bf16()
    assert rt.device == torch.device("cpu") and not rt.cuda and rt.channels_last
    assert rt.amp_dtype == (torch.bfloat16 if native else None)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)  # an older CPU: emulated bf16 is slow
    assert resolve_runtime("auto", "auto").amp_dtype is None
    assert resolve_runtime("cpu", "fp32").amp_dtype is None


def test_precision_on_the_cpu():
    with pytest.raises(PipelineError, match="fp16 needs CUDA"):
        resolve_runtime("cpu", "fp16")
    assert resolve_runtime("cpu", "bf16").amp_dtype == torch.bfloat16
    assert resolve_runtime("cpu", "fp32").amp_dtype is None
    # loss scaling only for fp16 (bf16 has fp32's range)
    assert Runtime(torch.device("cpu"), torch.float16, False).grad_scaler().is_enabled()
    assert not Runtime(torch.device("cpu"), torch.bfloat16, False).grad_scaler().is_enabled()
    assert not CPU.grad_scaler().is_enabled()


KEPT_RSS = """
import sys, torch
from pipeline.runtime import resolve_runtime
if sys.argv[1] == "cpu":
    resolve_runtime("cpu", "fp32")
def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
x = torch.ones(16 << 20)  # 64 MiB, every page touched
peak = rss_mib()
del x
print(peak - rss_mib())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or not os.confstr("CS_GNU_LIBC_VERSION"),
                    reason="glibc on Linux: the malloc tuning and /proc RSS")
def test_a_cpu_runtime_keeps_freed_memory_for_the_next_batch():
    # runtime.keep_freed_memory: freed tensors stay in the process (the next batch reuses their pages)
    # instead of going back to the kernel and faulting in again.
    def returned_mib(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", KEPT_RSS, mode], cwd=REPO, capture_output=True, text=True,
                             check=True)
        return float(out.stdout)
    assert returned_mib("default") > 60  # glibc's default: a 64 MiB block is munmapped on free
    assert returned_mib("cpu") < 4


WARM_UP = """
import sys, threading
from pipeline import tracking
tracking.warm_up()
next(t for t in threading.enumerate() if t.name == "mlflow-warm-up").join()
print("mlflow.pyfunc" in sys.modules)
"""


def test_the_mlflow_warm_up_imports_what_log_model_would_load_on_the_spot():
    # tracking.warm_up runs in a thread while training: log_model then finds mlflow.pyfunc loaded.
    out = subprocess.run([sys.executable, "-c", WARM_UP], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16+scaler"])
def test_autocast_epochs_run_on_the_cpu(amp):
    # The CUDA precisions' code paths (autocast, and for fp16 the GradScaler) exercised on the CPU.
    net, before, m, _ = toy_epoch(Runtime(torch.device("cpu"), amp, False))
    assert all(math.isfinite(m[k]) for k in ("train_loss", "train_acc", "val_loss", "val_acc"))
    after = net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # weights stay fp32 under autocast
    # close to the fp32 epoch: same data, same order, same initial weights
    assert m["train_loss"] == pytest.approx(toy_epoch(CPU)[2]["train_loss"], rel=0.05)


def test_channels_last_path_gives_the_same_results_on_the_cpu():
    # channels_last is what CUDA runtimes use; the code path itself runs on the CPU too.
    cl = Runtime(torch.device("cpu"), None, True)
    net, _, m, _ = toy_epoch(cl)
    assert net.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    ref = toy_epoch(CPU)[2]
    for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert m[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k


def test_place_keeps_cpu_data_where_it_is():
    x = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    assert place(x, CPU) is x


# -- a full run: what it writes and records -------------------------------------------------------


def test_run_writes_outputs_and_records_everything_in_mlflow(train_reference):
    p = train_reference
    s, hist = summary(p), history(p)
    epochs = TRAIN_FAST["train__epochs"]
    assert [int(h["epoch"]) for h in hist] == list(range(1, epochs + 1))
    assert s["stopped_epoch"] == epochs and "reached train.epochs" in s["stop_reason"]
    best = min(hist, key=lambda h: h["val_loss"])
    assert s["best_epoch"] == int(best["epoch"]) and s["best_val_loss"] == best["val_loss"]
    assert s["best_val_acc"] == best["val_acc"]
    assert not p.path(".checkpoints/train.pt").exists()  # removed after success

    c = p.client()
    run = c.get_run(s["run_id"])
    assert run.info.status == "FINISHED"
    assert len(p.runs()) == 1

    params = run.data.params
    assert params["train.lr"] == str(p.params()["train"]["lr"])
    assert params["prepare.image_size"] == "12"
    assert params["train.epochs"] == str(epochs)
    assert params["base.seed"] == "42" and params["data.source"] == "data/sources/src"
    net = rebuild(model_pt(p))
    total = sum(t.numel() for t in net.parameters())
    assert params["model.total_params"] == str(total)
    assert params["model.trainable_params"] == str(total)  # finetune: full

    for key in EPOCH_METRICS:
        logged = c.get_metric_history(run.info.run_id, EPOCH_KEYS[key])
        assert sorted(m.step for m in logged) == list(range(1, epochs + 1)), key  # one value per epoch
        by_step = {m.step: m.value for m in logged}
        if key in LEARNED:
            assert [by_step[e] for e in range(1, epochs + 1)] == pytest.approx([h[key] for h in hist], rel=1e-9)
    metrics = run.data.metrics
    for key in ("best_epoch", "best_val_loss", "best_val_acc", "stopped_epoch"):
        assert metrics[key] == pytest.approx(s[key]), key

    tags = run.data.tags
    assert tags["git.commit"]  # the commit, or "none" outside a git checkout (as here)
    assert tags["data.source"] == "data/sources/src"
    assert tags["stop_reason"] == s["stop_reason"]

    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"loss_curves.png", "train_history.csv"} <= artifacts
    assert p.path("reports/figures/loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # dvc plots show's
    headline = json.loads(p.path("reports/train_metrics.json").read_text())
    assert headline == {k: s[k] for k in ("best_epoch", "best_val_acc", "best_val_loss", "stopped_epoch")}
    assert run.info.run_name == "tinyvgg src"  # model and data (outside git: no changed params, no commit)
    # the experiment opens as model training in the UI; the run has a System metrics tab
    assert c.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system
    local = Path(c.download_artifacts(run.info.run_id, "train_history.csv", str(p.root.parent / "dl")))
    assert local.read_text() == p.path("reports/train_history.csv").read_text()
    assert Path(c.download_artifacts(run.info.run_id, "loss_curves.png", str(p.root.parent / "dl"))) \
        .read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "data/sources/src"
    assert {t.key: t.value for t in inputs[0].tags}.get("mlflow.data.context") == "training"

    uri = s["model_uri"]
    assert uri.startswith("models:/m-")
    assert c.get_logged_model(uri.removeprefix("models:/")).source_run_id == run.info.run_id


def test_logged_model_and_model_pt_predict_the_same_probabilities(train_reference):
    import mlflow

    p = train_reference
    saved = model_pt(p)
    cfg = saved["config"]
    assert cfg["classes"] == ["circle", "square", "stripes"] and cfg["channels"] == 1 and cfg["image_size"] == 12
    x = np.random.default_rng(1).random((5, 1, 12, 12), dtype=np.float32)
    with inside_project(p):
        probs = pyfunc_probabilities(mlflow.pyfunc.load_model(summary(p)["model_uri"]), x, cfg["classes"])
    assert probs.shape == (5, 3)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5) and (probs >= 0).all()
    # the config's normalisation, then the rebuilt network, then softmax: the served model's maths
    norm = (torch.from_numpy(x) - torch.tensor(cfg["mean"]).view(1, -1, 1, 1)) / torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        local = torch.softmax(rebuild(saved)(norm), dim=1).numpy()
        loaded = load_classifier(p.path("models/model.pt"))(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(local, probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded, probs, rtol=1e-5, atol=1e-6)


def test_same_seed_params_and_data_give_identical_results(train_data, train_reference, tmp_path, mlflow_template):
    again = copy_prepared(train_data, tmp_path, mlflow_template)
    again.run("train")
    a, b = history(train_reference), history(again)
    assert [[h[k] for k in LEARNED] for h in a] == [[h[k] for k in LEARNED] for h in b]
    assert_same_tensors(model_pt(train_reference)["state_dict"], model_pt(again)["state_dict"])


# -- early stopping in a real run -----------------------------------------------------------------


def test_early_stopping_keeps_the_best_epochs_weights(tmp_path, mlflow_template):
    # Random-pixel images: the model memorises the train split and val_loss stops improving.
    p = prepared_project(tmp_path, mlflow_template, noise_images, prepare__image_size=12,
                         train__hidden_units=8, train__epochs=15, train__patience=2, train__lr=0.01,
                         train__optimizer="adam", train__scheduler="none", train__augment=[],
                         train__batch_size=16, train__monitor="val_loss", train__min_delta=0.0)
    p.run("train")
    s, hist = summary(p), history(p)
    val = [h["val_loss"] for h in hist]
    best = int(np.argmin(val)) + 1
    assert s["stopped_epoch"] < 15 and len(hist) == s["stopped_epoch"]
    assert s["best_epoch"] == best and s["stopped_epoch"] == best + 2  # patience epochs after the best
    assert "early stopping" in s["stop_reason"] and "patience=2" in s["stop_reason"]
    assert s["best_val_loss"] == val[best - 1]
    run = p.client().get_run(s["run_id"])
    assert run.data.metrics["stopped_epoch"] == s["stopped_epoch"]
    assert run.data.metrics["best_epoch"] == best

    # models/model.pt holds the best epoch's weights: evaluated again it gives exactly that epoch's
    # val_loss, which no other epoch had (the last epoch's weights would give a worse one)
    saved = model_pt(p)
    cfg = saved["config"]
    split = load_split("val", p.path("data/prepared"))
    trained_on = resolve_runtime("cpu", p.params()["train"]["precision"])  # the numerics train used
    m = evaluate(rebuild(saved), torch.from_numpy(np.array(split.images)), torch.from_numpy(split.labels),
                 eval_transforms(Norm(tuple(cfg["mean"]), tuple(cfg["std"]))), 32, trained_on)
    assert m["val_loss"] == pytest.approx(val[best - 1], rel=1e-6)
    assert all(abs(v - val[best - 1]) > 1e-5 for e, v in enumerate(val, 1) if e != best)


# -- warm start from the MLflow registry ----------------------------------------------------------


def test_warm_start_from_a_registered_model(train_reference, tmp_path):
    import mlflow

    p = train_reference.clone(tmp_path)
    with inside_project(p):
        version = mlflow.register_model(summary(p)["model_uri"], "warm-source")
        p.client().set_registered_model_alias("warm-source", "base", version.version)
    # new data with 4 classes (the registered model has 3), same size and channels
    make_images(p.path("data/sources/four"), classes=("circle", "square", "stripes", "bars"), per_class=12,
                size=16, seed=5)
    p.set(data__source="data/sources/four", train__weights="models:/warm-source@base", train__finetune="head",
          train__epochs=2)
    from pipeline.fetch_data import fetch
    from pipeline.prepare import prepare

    p.call(fetch)
    p.call(prepare)
    source = model_pt(train_reference)
    p.run("train")
    saved = model_pt(p)
    assert len(saved["config"]["classes"]) == 4
    # the classifier was replaced for 4 classes; everything else came from the registered model and,
    # frozen (finetune: head), is still exactly as loaded, BN statistics included
    assert saved["state_dict"]["classifier.2.weight"].shape == (4, 8 * 3 * 3)
    assert source["state_dict"]["classifier.2.weight"].shape == (3, 8 * 3 * 3)
    features = [k for k in source["state_dict"] if k.startswith("features.")]
    assert features and any("running_mean" in k for k in features)
    for k in features:
        assert torch.equal(saved["state_dict"][k], source["state_dict"][k]), k
    # and the registered model's normalisation, not the new data's
    meta = json.loads(p.path("data/prepared/meta.json").read_text())
    assert saved["config"]["mean"] == pytest.approx(source["config"]["mean"])
    assert meta["mean"] != pytest.approx(source["config"]["mean"])
    assert saved["config"]["std"] == pytest.approx(source["config"]["std"])
    # the run records which version the alias resolved to when it started
    run = p.client().get_run(summary(p)["run_id"])
    assert run.data.tags["train.weights_resolved"] == f"models:/warm-source/{version.version}"


# -- interrupted and failing runs -----------------------------------------------------------------


@pytest.mark.parametrize("sig,code,message", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                              (signal.SIGINT, 130, "interrupted (SIGINT)")])
def test_signal_during_training_kills_the_run_and_writes_nothing(train_data, tmp_path, mlflow_template,
                                                                 sig, code, message):
    p = copy_prepared(train_data, tmp_path, mlflow_template, train__epochs=500, train__patience=500)
    bg = p.start_stage("train")
    ckpt = wait_for_checkpoint(p, bg, epoch=1)
    bg.send_signal(sig)
    bg.wait()
    err = bg.output()
    assert bg.returncode == code, err
    assert message in err
    (run,) = p.runs()
    assert run.info.run_id == ckpt["run_id"]
    assert run.info.status == "KILLED"
    assert not p.path("models/model.pt").exists()
    assert not p.path("reports/train.json").exists()
    assert not p.path("reports/train_history.csv").exists()


def test_crash_mid_run_fails_the_run(train_data, tmp_path, mlflow_template):
    # train.checkpoint_dir under a file: the first epoch trains, then its checkpoint cannot be written.
    p = copy_prepared(train_data, tmp_path, mlflow_template, train__checkpoint_dir="params.yaml/ckpt")
    proc = p.run("train", check=False)
    assert proc.returncode == 1
    assert "NotADirectoryError" in proc.stderr and "epoch 1/" in proc.stderr  # failed after training began
    (run,) = p.runs()
    assert run.info.status == "FAILED"
    assert not p.path("models/model.pt").exists() and not p.path("reports/train.json").exists()


def test_corrupted_prepared_data_fails_cleanly_before_any_run(train_data, tmp_path, mlflow_template):
    p = copy_prepared(train_data, tmp_path, mlflow_template)
    p.path("data/prepared/val.npy").unlink()
    proc = p.run("train", check=False)
    assert proc.returncode == 1
    assert "val.npy: missing or corrupted" in proc.stderr and "Traceback" not in proc.stderr
    assert p.runs() == []  # no run was started, so none is left RUNNING
    assert not p.path("models/model.pt").exists()


# -- torchvision weights in a real run, offline ---------------------------------------------------


def test_run_with_default_weights_from_the_hub_cache_offline(train_data, tmp_path, mlflow_template, offline):
    p = copy_prepared(train_data, tmp_path, mlflow_template, train__model="mobilenet_v3_small",
                      train__weights="DEFAULT", train__finetune="head", train__epochs=1)
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    cached = Path(p.env()["TORCH_HOME"]) / "hub" / "checkpoints" / os.path.basename(url)
    torch.manual_seed(123)
    donor = torchvision.models.mobilenet_v3_small().state_dict()  # random: not torchvision's file
    cached.parent.mkdir(parents=True)
    torch.save(donor, cached)
    p.run("train")

    saved = model_pt(p)
    state = {k.removeprefix("net."): v for k, v in saved["state_dict"].items()}  # 12 px: MinSize wrapper
    # greyscale data: the first conv is the donor's summed over RGB, and ImageNet's mean/std averaged
    assert torch.allclose(state["features.0.0.weight"], donor["features.0.0.weight"].sum(1, keepdim=True))
    assert saved["config"]["mean"] == pytest.approx([(0.485 + 0.456 + 0.406) / 3])
    assert saved["config"]["std"] == pytest.approx([(0.229 + 0.224 + 0.225) / 3])
    # finetune head: the rest of the donor, BN statistics included, is untouched; only a new head trained
    for k, v in donor.items():
        if (k.startswith("features.") and k != "features.0.0.weight") or k.startswith("classifier.0."):
            assert torch.equal(state[k], v), k
    assert state["classifier.3.weight"].shape == (3, 1024)
