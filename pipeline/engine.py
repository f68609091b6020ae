"""The one engine: `train_one_epoch`, `evaluate` and `fit` (epochs with early stopping), used by train,
evaluate and the benchmark.

Data are whole uint8 tensors (N, C, H, W) sliced into batches in place: no DataLoader workers, no
per-image decoding. On CUDA the uint8 tensor lives on the GPU when it fits (4x smaller than float),
otherwise in pinned memory with non_blocking copies. Losses and correct counts are summed on the
device and read once per epoch, so there is no per-batch `.item()` sync.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline import distributed
from pipeline.config import Train
from pipeline.dataset import DatasetMeta, load_meta, load_split
from pipeline.models import set_train_mode
from pipeline.paths import PREPARED_DIR
from pipeline.runtime import Runtime, place
from pipeline.transforms import Norm, Transform, eval_transforms, to_float, train_transforms

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    """The train and val splits as uint8 images and int64 labels, where training reads them."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    meta: DatasetMeta


def load_train_data(rt: Runtime, folder: Path = PREPARED_DIR) -> TrainData:
    meta = load_meta(folder)
    tensors = []
    for split in ("train", "val"):
        s = load_split(split, folder, meta)
        tensors += [place(torch.from_numpy(np.array(s.images)), rt),  # read the memmap into memory
                    torch.from_numpy(s.labels).to(rt.device)]
    return TrainData(*tensors, meta=meta)


@dataclass
class Learner:
    """What the training steps work on: built once by train (and the benchmark), passed down whole."""

    net: nn.Module  # the network: evaluated, checkpointed and saved
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None  # stepped per batch
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    generator: torch.Generator  # shuffling and augmentation (on the CPU: reproducible, resumable)
    rt: Runtime
    frozen: list[nn.Module] = field(default_factory=list)  # parts whose batch norm stays in eval mode
    model: nn.Module | None = None  # what the steps run: the DDP wrapper of `net` under DDP

    def __post_init__(self) -> None:
        self.model = self.model or self.net


@dataclass(frozen=True)
class Inputs:
    """How batches of the training data become model input: `train` (random, from the learner's
    generator) and `eval`. Images: augmentation and normalisation; cached features: pick a view."""

    train: Transform
    eval: Transform


def image_inputs(norm: Norm, augment: tuple[str, ...], generator: torch.Generator) -> Inputs:
    return Inputs(train_transforms(norm, augment, generator), eval_transforms(norm))


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


def _batch(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, rt: Runtime):
    x = images[idx.to(images.device)].to(rt.device, non_blocking=True)
    y = labels[idx.to(labels.device)].to(rt.device, non_blocking=True)
    return x, y


def train_one_epoch(learner: Learner, images: torch.Tensor, labels: torch.Tensor, transform: Transform,
                    batch_size: int, desc: str = "train") -> dict[str, float]:
    """One pass over the training split in a random order drawn from the learner's generator.

    The model must already be in train mode (models.set_train_mode). Returns train_loss (mean per
    image), train_acc (per image over the split), images_per_second and epoch_seconds; under DDP
    each rank trains on its shard and the numbers are over all ranks.
    """
    rt, opt = learner.rt, learner.optimizer
    start = time.perf_counter()
    order = distributed.shard(torch.randperm(len(images), generator=learner.generator))
    total_loss = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.int64)
    batches = range(0, len(order), batch_size)
    for i in tqdm(batches, desc=desc, leave=False, disable=not sys.stderr.isatty()):
        x, y = _batch(images, labels, order[i:i + batch_size], rt)
        x = transform(x)
        if rt.channels_last and x.dim() == 4:  # images; cached features are vectors
            x = x.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            logits = learner.model(x)
            loss = learner.loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        learner.scaler.scale(loss).backward()
        learner.scaler.step(opt)
        learner.scaler.update()
        if learner.scheduler is not None:
            learner.scheduler.step()
        total_loss += loss.detach() * len(y)
        correct += (logits.detach().argmax(dim=1) == y).sum()
    seen = distributed.all_sum(torch.tensor([float(len(order))], device=rt.device)).item()
    total_loss = distributed.all_sum(total_loss)
    correct = distributed.all_sum(correct)
    seconds = time.perf_counter() - start
    return {
        "train_loss": total_loss.item() / seen,
        "train_acc": correct.item() / seen,
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
        if rt.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            out.append(model(x).float())
    return torch.cat(out).cpu() if out else torch.empty(0)


def classify(model: nn.Module, images: np.ndarray, batch_size: int, rt: Runtime) -> torch.Tensor:
    """Class probabilities (float32, on the CPU) for uint8 images through a served model, which
    normalises its input itself (models.Classifier)."""
    model = model.to(rt.device).eval()
    return predict_logits(model, torch.from_numpy(np.array(images)), to_float, batch_size, rt)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, transform: Transform,
             batch_size: int, rt: Runtime, prefix: str = "val") -> dict[str, float]:
    """Mean cross-entropy per image and per-image accuracy over a whole split."""
    was_training = model.training
    model.eval()
    logits = predict_logits(model, images, transform, batch_size, rt)
    model.train(was_training)
    targets = labels.cpu()
    return {
        f"{prefix}_loss": F.cross_entropy(logits, targets).item(),
        f"{prefix}_acc": (logits.argmax(dim=1) == targets).float().mean().item(),
    }


class EarlyStopper:
    """Stop after `patience` epochs (num_trials, in the notebooks this grew from) without an
    improvement of more than `min_delta` in `monitor`; the best epoch's weights are kept by fit."""

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
class TrainState:
    """Everything about a training run that moves from epoch to epoch: checkpointed after each."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_state: dict | None = None  # the best epoch's weights, on the CPU
    stopper: dict | None = None  # EarlyStopper.state_dict()
    run_id: str | None = None  # the MLflow run, resumed with the checkpoint


def fit(cfg: Train, learner: Learner, data: TrainData, inputs: Inputs, state: TrainState,
        on_epoch: Callable[[TrainState], None]) -> tuple[TrainState, str]:
    """Train from `state.epoch` until train.epochs or early stopping; `on_epoch(state)` runs after
    each epoch (checkpoint, tracking). Returns the final state and why training stopped."""
    stopper = EarlyStopper(cfg.monitor, cfg.patience, cfg.min_delta)
    if state.stopper:
        stopper.load_state_dict(state.stopper)
    augment, plain = inputs.train, inputs.eval
    reason = f"reached train.epochs={cfg.epochs}"
    while state.epoch < cfg.epochs:
        if stopper.should_stop:
            break
        epoch = state.epoch + 1
        set_train_mode(learner.model, learner.frozen)
        metrics = train_one_epoch(learner, data.train_x, data.train_y, augment, cfg.batch_size, desc=f"epoch {epoch}")
        metrics.update(evaluate(learner.net, data.val_x, data.val_y, plain, cfg.batch_size * 2, learner.rt))
        metrics["lr"] = learner.optimizer.param_groups[0]["lr"]
        # Rank 0's numbers decide for all ranks, so every rank stops at the same epoch whatever
        # rounding differences their own evaluations have.
        metrics = distributed.broadcast_object(metrics)
        if stopper.step(metrics[cfg.monitor], epoch):
            state.best_state = {k: v.detach().to("cpu", copy=True) for k, v in learner.net.state_dict().items()}
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
