"""Stage train: data/prepared/ -> models/model.pt, reports/train.json, reports/train_history.csv,
and one MLflow run (params, per-epoch metrics, curves, the best model), completed later by evaluate.

After every epoch a checkpoint is written atomically to train.checkpoint_dir. Run again after a
crash or `kill -9` with the same params and data, the stage resumes from it in the same MLflow run
and ends with the same weights and metrics as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import distributed, plots, tracking
from pipeline.cli import run_stage
from pipeline.config import Params, PipelineError, Train
from pipeline.engine import Runtime, evaluate, place, prepare_model, resolve_runtime, train_one_epoch
from pipeline.io import atomic_path, remove, write_json
from pipeline.models import (Classifier, apply_finetune, build_from_config, build_model, resolve_weights,
                             set_train_mode)
from pipeline.prepared import PREPARED_DIR, load_meta, load_split
from pipeline.transforms import eval_transforms, train_transforms

log = logging.getLogger(__name__)

MODEL_PATH = Path("models/model.pt")
TRAIN_JSON = Path("reports/train.json")
HISTORY_CSV = Path("reports/train_history.csv")
CHECKPOINT_NAME = "train.pt"
CHECKPOINT_MAGIC = b"pipeline-checkpoint sha256="  # the first line; the torch.save payload follows
HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds",
                  "images_per_second"]


class EarlyStopper:
    """The notes' early stopping: stop after `patience` (num_trials) epochs without an improvement
    of more than `min_delta` in `monitor`; the best epoch's weights are kept by the caller."""

    def __init__(self, monitor: str, patience: int, min_delta: float):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.best: float | None = None
        self.best_epoch = 0
        self.bad_epochs = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; True when it is a new best."""
        sign = 1 if self.monitor == "val_loss" else -1  # lower loss, higher accuracy is better
        if self.best is None or sign * (self.best - value) > self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


@dataclass
class Splits:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    meta: dict

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])


def load_data(rt: Runtime, folder: Path = PREPARED_DIR) -> Splits:
    """The train and val splits as uint8 tensors where training will read them."""
    meta = load_meta(folder)
    tensors = []
    for split in ("train", "val"):
        s = load_split(split, folder, meta)
        tensors += [place(torch.from_numpy(np.array(s.images)), rt),  # read the memmap into memory
                    torch.from_numpy(s.labels).to(rt.device)]
    return Splits(*tensors, meta=meta)


def build(cfg: Train, meta: dict) -> tuple[nn.Module, list[nn.Module], dict]:
    """The network, its frozen parts, and the config that rebuilds it (saved with the weights)."""
    pretrained, norm = resolve_weights(cfg.model, cfg.weights)
    if norm and len(norm["mean"]) != meta["channels"]:
        # Fix: ImageNet (or a warm-start model's) statistics are per RGB channel. Used as they are on
        # greyscale data, (x - mean) / std broadcast 1 channel to 3 and the first conv (adapted to 1
        # channel by build_model) failed at the first batch. One channel gets the channels' average.
        norm = {k: [sum(v) / len(v)] * meta["channels"] for k, v in norm.items()}
    config = {"model": cfg.model, "num_classes": len(meta["classes"]), "channels": meta["channels"],
              "image_size": meta["image_size"], "hidden_units": cfg.hidden_units,
              "batch_norm": cfg.batch_norm, "dropout": cfg.dropout, "classes": meta["classes"],
              **(norm or {"mean": meta["mean"], "std": meta["std"]})}
    net = build_model(cfg.model, config["num_classes"], config["channels"], config["image_size"],
                      hidden_units=cfg.hidden_units, batch_norm=cfg.batch_norm, dropout=cfg.dropout,
                      pretrained=pretrained)
    frozen = apply_finetune(net, cfg.model, cfg.finetune, cfg.unfreeze_last)
    return net, frozen, config


def make_optimizer(cfg: Train, net: nn.Module, steps: int):
    """Optimizer over trainable parameters only (frozen ones get no state), and a per-batch
    scheduler over `steps` batches in all."""
    trainable = [p for p in net.parameters() if p.requires_grad]
    fast = {"fused": True}  # one kernel per step for all parameters, on CUDA and on the CPU
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(trainable, lr=cfg.lr, momentum=0.9, nesterov=True,
                              weight_decay=cfg.weight_decay, **fast)
    else:
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        opt = cls(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)
    if cfg.scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    elif cfg.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    else:
        sched = None
    return opt, sched


def fingerprint(params: Params, meta: dict, rt: Runtime) -> str:
    """What a checkpoint must match to be resumed: seed, train params, data and device type."""
    key = {"params": params.flat("base", "train"), "data": meta["splits"], "device": rt.device.type}
    key["params"].pop("train.checkpoint_dir")
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass
class State:
    """Everything that moves during training: checkpointed after every epoch."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_state: dict | None = None
    stopper: dict | None = None
    run_id: str | None = None


def save_checkpoint(path: Path, fp: str, state: State, net, opt, sched, scaler, gen: torch.Generator) -> None:
    ckpt = {
        "fingerprint": fp, "epoch": state.epoch, "history": state.history, "run_id": state.run_id,
        "best_state": state.best_state, "stopper": state.stopper,
        "model": net.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched else None, "scaler": scaler.state_dict(),
        "rng": {"generator": gen.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": np.random.get_state(), "python": random.getstate()},
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    payload = buf.getbuffer()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(CHECKPOINT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
        f.write(payload)


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's content, after checking its sha256: torch.load alone accepts a file whose
    tensor bytes changed on disk, and training would resume from the damaged weights silently."""
    data = memoryview(path.read_bytes())
    head_end = bytes(data[:len(CHECKPOINT_MAGIC) + 65]).find(b"\n")
    head = bytes(data[:head_end]) if head_end > 0 else b""
    if not head.startswith(CHECKPOINT_MAGIC):
        raise ValueError("no checksum header (not written by this version of train)")
    payload = data[head_end + 1:]
    if hashlib.sha256(payload).hexdigest() != head[len(CHECKPOINT_MAGIC):].decode(errors="replace"):
        raise ValueError("sha256 mismatch: the file changed after it was written")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


def load_checkpoint(path: Path, fp: str, set_aside: bool = True) -> dict | None:
    """The checkpoint at `path` if it is intact and belongs to this configuration; a foreign or
    damaged one is set aside (renamed *.stale, *.stale1, ...; by rank 0 alone under DDP) rather
    than used. The MLflow run of a foreign one, left RUNNING by the kill, is marked KILLED."""
    if not path.exists():
        return None
    ckpt = None
    try:
        ckpt = read_checkpoint(path)
        ok = ckpt.get("fingerprint") == fp
        reason = "params or data changed"
    except Exception as e:  # a damaged file: a checksum mismatch, unpickling errors of many kinds
        ok, reason = False, f"unreadable: {e}"
    if not ok:
        if set_aside:
            stale = _free_name(path.with_suffix(".stale"))
            path.replace(stale)
            reason += f"; kept as {stale.name}"
            if ckpt and ckpt.get("run_id"):
                tracking.end_abandoned_run(ckpt["run_id"], f"its checkpoint was set aside: {reason}")
        log.warning("not resuming from %s (%s); starting afresh", path, reason)
        return None
    return ckpt


def _free_name(path: Path) -> Path:
    """`path`, or path1, path2, ... when taken: an earlier set-aside checkpoint is not overwritten."""
    n, free = 0, path
    while free.exists():
        n += 1
        free = path.with_name(f"{path.name}{n}")
    return free


def restore(ckpt: dict, net, opt, sched, scaler, gen: torch.Generator) -> State:
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if sched is not None:
        sched.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    gen.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return State(epoch=ckpt["epoch"], history=ckpt["history"], best_state=ckpt["best_state"],
                 stopper=ckpt["stopper"], run_id=ckpt["run_id"])


def fit(cfg: Train, net: nn.Module, frozen: list[nn.Module], data: Splits, norm: dict, rt: Runtime,
        gen: torch.Generator, opt, sched, scaler, state: State, on_epoch,
        model: nn.Module | None = None) -> tuple[State, str]:
    """Train from `state.epoch` until train.epochs or early stopping; `on_epoch(state)` runs after
    each epoch (checkpoint, tracking). Under DDP `model` is the DistributedDataParallel wrapper of
    `net` that the training steps go through. Returns the final state and why training stopped."""
    model = model or net
    stopper = EarlyStopper(cfg.monitor, cfg.patience, cfg.min_delta)
    if state.stopper:
        stopper.load_state_dict(state.stopper)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    augment = train_transforms(norm["mean"], norm["std"], cfg.augment, gen)
    plain = eval_transforms(norm["mean"], norm["std"])
    reason = f"reached train.epochs={cfg.epochs}"
    while state.epoch < cfg.epochs:
        if stopper.should_stop:
            break
        epoch = state.epoch + 1
        set_train_mode(model, frozen)
        metrics = train_one_epoch(model, data.train_x, data.train_y, augment, opt, sched, scaler, loss_fn,
                                  cfg.batch_size, gen, rt, data.num_classes, desc=f"epoch {epoch}")
        metrics.update(evaluate(net, data.val_x, data.val_y, plain, cfg.batch_size * 2, rt, data.num_classes))
        metrics["lr"] = opt.param_groups[0]["lr"]
        # Rank 0's numbers decide for all ranks, so every rank stops at the same epoch whatever
        # rounding differences their own evaluations have.
        metrics = distributed.broadcast_object(metrics)
        if stopper.step(metrics[cfg.monitor], epoch):
            state.best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        state.stopper = stopper.state_dict()
        state.history.append({"epoch": epoch, **metrics})
        state.epoch = epoch
        if distributed.is_main():
            log.info("epoch %d/%d  train_loss %.4f  train_acc %.4f  val_loss %.4f  val_acc %.4f  lr %.2e  "
                     "%.1fs  %.0f img/s", epoch, cfg.epochs, metrics["train_loss"], metrics["train_acc"],
                     metrics["val_loss"], metrics["val_acc"], metrics["lr"], metrics["epoch_seconds"],
                     metrics["images_per_second"])
        on_epoch(state)
    if stopper.should_stop:
        reason = (f"early stopping: no {cfg.monitor} improvement over train.min_delta={cfg.min_delta} "
                  f"for train.patience={cfg.patience} epochs")
    return state, reason


def _history_csv(history: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def write_outputs(net: nn.Module, config: dict, state: State, summary: dict) -> None:
    """models/model.pt (best weights + the config that rebuilds model and transforms, loadable with
    weights_only=True), reports/train.json and reports/train_history.csv, each renamed into place."""
    with atomic_path(HISTORY_CSV) as tmp:
        tmp.write_text(_history_csv(state.history))
    with atomic_path(MODEL_PATH) as tmp:
        torch.save({"state_dict": state.best_state, "config": config}, tmp)
    write_json(TRAIN_JSON, summary)


def main(params: Params) -> None:
    cfg = params.train
    if distributed.is_main():
        tracking.configure(params.mlflow.experiment)  # an unreachable server fails here, before any work
    if cfg.nproc > 1 and not distributed.launched():
        code = distributed.relaunch(cfg.nproc, "pipeline.train", sys.argv[1:])
        if code != 0:
            raise PipelineError(f"train under torchrun --nproc_per_node={cfg.nproc} exited {code}")
        return
    if distributed.launched():
        distributed.die_with_parent()
        if not distributed.launcher_alive():
            raise PipelineError("torchrun, which started this worker, is gone; re-run the train stage")
    try:
        _train(params)
    finally:
        distributed.finish()


def _train(params: Params) -> None:
    started = time.perf_counter()
    cfg = params.train
    rt = resolve_runtime(params.base.device, cfg.precision)
    if distributed.launched():
        rt = Runtime(distributed.init(rt.device), rt.amp_dtype, rt.channels_last)
    main_rank = distributed.is_main()
    data = load_data(rt)
    torch.manual_seed(params.base.seed)  # model initialisation and dropout, the same on every rank
    random.seed(params.base.seed)
    np.random.seed(params.base.seed)
    gen = torch.Generator().manual_seed(params.base.seed)  # shuffling and augmentation
    net, frozen, config = build(cfg, data.meta)
    net = prepare_model(net, rt)
    model = net
    if distributed.world_size() > 1:
        net = distributed.convert_sync_batchnorm(net)  # batch statistics over all ranks' samples
        model = nn.parallel.DistributedDataParallel(net, device_ids=[rt.device.index] if rt.cuda else None)
    norm = {"mean": config["mean"], "std": config["std"]}
    steps = cfg.epochs * math.ceil(len(distributed.shard(torch.arange(len(data.train_x)))) / cfg.batch_size)
    opt, sched = make_optimizer(cfg, net, steps)
    scaler = rt.grad_scaler()

    fp = fingerprint(params, data.meta, rt)
    ckpt_path = Path(cfg.checkpoint_dir) / CHECKPOINT_NAME
    ckpt = load_checkpoint(ckpt_path, fp, set_aside=main_rank)
    state = restore(ckpt, net, opt, sched, scaler, gen) if ckpt else State()
    tags = {**tracking.git_tags(), **tracking.dvc_exp_tags(), "data.source": params.data.source,
            "dvc.prepared_md5": tracking.dvc_out_hash(str(PREPARED_DIR)), "stage": "train",
            "train.processes": distributed.world_size()}
    run_ctx = (tracking.run(state.run_id, run_name=f"{cfg.model}-{params.data.source}", tags=tags)
               if main_rank else contextlib.nullcontext())
    with run_ctx as run:
        if main_rank:
            state.run_id = run.info.run_id
            tracking.warm_up()
            if ckpt:
                log.info("resuming MLflow run %s from epoch %d (%s)", state.run_id, state.epoch, ckpt_path)
                _log_missing_epochs(state)
            else:
                _log_start(params, net, data)

        def on_epoch(s: State) -> None:
            if main_rank:  # checkpoint first: a kill between the two leaves an epoch to re-log on resume
                save_checkpoint(ckpt_path, fp, s, net, opt, sched, scaler, gen)
                tracking.log_metrics({k: v for k, v in s.history[-1].items() if k != "epoch"}, step=s.epoch)

        state, reason = fit(cfg, net, frozen, data, norm, rt, gen, opt, sched, scaler, state, on_epoch, model)
        if main_rank:
            summary = _finish(params, net, config, state, reason)
            summary["stage_seconds"] = time.perf_counter() - started
            spent = tracking.seconds_spent()  # before end_run: a few ms more
            summary["mlflow_logging_seconds"], summary["mlflow_setup_seconds"] = spent["logging"], spent["setup"]
            write_outputs(net, config, state, summary)
    distributed.barrier()
    if main_rank:
        remove(ckpt_path)
        log.info("best epoch %d (val_acc %.4f), %s; run %s", summary["best_epoch"], summary["best_val_acc"],
                 reason, state.run_id)


def _log_start(params: Params, net: nn.Module, data: Splits) -> None:
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    tracking.log_params({**params.flat("base", "data", "prepare", "train"),
                         "model.total_params": total, "model.trainable_params": trainable})
    digest = hashlib.sha256(json.dumps(data.meta["splits"], sort_keys=True).encode()).hexdigest()
    tracking.log_dataset(PREPARED_DIR, name=params.data.source, digest=digest, context="training")


def _log_missing_epochs(state: State) -> None:
    """Re-log epochs a kill cut off between the checkpoint and its MLflow call, and only those."""
    logged = tracking.logged_steps(state.run_id, "val_loss")
    for row in state.history:
        if row["epoch"] not in logged:
            tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])


def _finish(params: Params, net: nn.Module, config: dict, state: State, reason: str) -> dict:
    """Load the best epoch's weights into `net`, log summary metrics, curves and the model."""
    best = next(h for h in state.history if h["epoch"] == state.stopper["best_epoch"])
    net.load_state_dict(state.best_state)
    summary = {"run_id": state.run_id, "model": config["model"], "best_epoch": best["epoch"],
               "best_val_loss": best["val_loss"], "best_val_acc": best["val_acc"],
               "stopped_epoch": state.epoch, "stop_reason": reason}
    tracking.log_metrics({k: summary[k] for k in ("best_epoch", "best_val_loss", "best_val_acc",
                                                  "stopped_epoch")})
    tracking.set_tags({"stop_reason": reason, "best_epoch": best["epoch"]})
    tracking.log_text(_history_csv(state.history), "train_history.csv")
    fig = plots.loss_curves(state.history)
    tracking.log_figure(fig, "loss_curves.png")
    plots.close(fig)
    served = Classifier(_cpu_copy(net, config), config["mean"], config["std"], config["classes"],
                        config["image_size"], config["channels"])
    example = np.random.default_rng(0).random(
        (2, config["channels"], config["image_size"], config["image_size"]), dtype=np.float32)
    summary["model_uri"] = tracking.log_model(served, example, step=best["epoch"])
    return summary


def _cpu_copy(net: nn.Module, config: dict) -> nn.Module:
    """A float32 CPU copy of the trained network for logging (no channels_last, no CUDA)."""
    cpu = build_from_config(config)
    cpu.load_state_dict({k: v.detach().cpu().float() if v.is_floating_point() else v.cpu()
                         for k, v in net.state_dict().items()})
    return cpu.eval()


if __name__ == "__main__":
    run_stage(main)
