"""Stage train: data/prepared/ -> models/model.pt, reports/train.json, reports/train_history.csv,
and one MLflow run (params, per-epoch metrics, curves, the best model), completed later by evaluate.

With `train.finetune: head` (and `train.feature_cache`), the frozen network's features are computed
once and the classifier trains on them (pipeline/features.py); the saved and logged model is the whole
network all the same.

After every epoch a checkpoint is written atomically to train.checkpoint_dir (pipeline/checkpoint.py).
Run again after a crash or `kill -9` with the same params and data, the stage resumes from it in
the same MLflow run and ends with the same weights and metrics as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import nn

from pipeline import distributed, features, plots, provenance, tracking
from pipeline.checkpoint import (
    CHECKPOINT_NAME,
    fingerprint,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from pipeline.cli import run_stage
from pipeline.config import Params, Train
from pipeline.dataset import DatasetMeta
from pipeline.engine import (
    Inputs,
    Learner,
    TrainData,
    TrainState,
    fit,
    image_inputs,
    load_train_data,
    make_optimizer,
)
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, remove, write_json
from pipeline.models import (
    Classifier,
    ModelConfig,
    apply_finetune,
    build_from_config,
    head_name,
    unwrap,
)
from pipeline.paths import (
    HISTORY_CSV,
    LOSS_PNG,
    MODEL_PATH,
    PREPARED_DIR,
    TRAIN_JSON,
    TRAIN_METRICS,
)
from pipeline.runtime import Runtime, prepare_model, resolve_runtime
from pipeline.transforms import Norm
from pipeline.urls import redact
from pipeline.weights import resolve_weights

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds",
                  "images_per_second"]
# An epoch's numbers in MLflow, by section: the UI folds a key's prefix before "/" into a section and
# orders sections by name, so the curves (accuracy, loss) come first on a run's page.
EPOCH_KEYS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
              "val_acc": "accuracy/val", "lr": "optimizer/lr", "epoch_seconds": "speed/epoch_seconds",
              "images_per_second": "speed/images_per_second"}


def epoch_metrics(row: dict) -> dict[str, float]:
    """A train_history row as MLflow metrics (EPOCH_KEYS)."""
    return {EPOCH_KEYS[k]: v for k, v in row.items() if k in EPOCH_KEYS}


@dataclass
class Network:
    net: nn.Module
    frozen: list[nn.Module]  # what train.finetune froze
    config: ModelConfig  # saved with the weights
    weights_source: str | None  # what train.weights resolved to


def build(cfg: Train, meta: DatasetMeta) -> Network:
    """The network to train on data described by `meta`, from train.weights when set."""
    pretrained = resolve_weights(cfg.model, cfg.weights)
    norm = pretrained.norm if pretrained and pretrained.norm else Norm(meta.mean, meta.std)
    if len(norm.mean) != meta.channels:
        # ImageNet's (or an RGB warm start's) statistics are per RGB channel, while build_model
        # adapts the first conv to greyscale input: one channel takes the channels' average.
        norm = Norm(*(tuple([sum(v) / len(v)] * meta.channels) for v in (norm.mean, norm.std)))
    config = ModelConfig(model=cfg.model, channels=meta.channels, image_size=meta.image_size,
                         hidden_units=cfg.hidden_units, batch_norm=cfg.batch_norm, dropout=cfg.dropout,
                         classes=meta.classes, mean=norm.mean, std=norm.std)
    net = build_from_config(config, pretrained.state if pretrained else None)
    frozen = apply_finetune(net, cfg.model, cfg.finetune, cfg.unfreeze_last)
    return Network(net, frozen, config, pretrained.source if pretrained else None)


def make_learner(cfg: Train, net: nn.Module, frozen: list[nn.Module], data: TrainData, rt: Runtime,
                 seed: int) -> Learner:
    """`net` (the network, or the head on cached features) on its device (wrapped for DDP under
    torchrun), its optimizer and schedule."""
    net = prepare_model(net, rt)
    model = None
    if distributed.world_size() > 1:
        net = distributed.convert_sync_batchnorm(net)  # batch statistics over all ranks' samples
        model = nn.parallel.DistributedDataParallel(net, device_ids=[rt.device.index] if rt.cuda else None)
    steps = cfg.epochs * math.ceil(len(distributed.shard(torch.arange(len(data.train_x)))) / cfg.batch_size)
    opt, sched = make_optimizer(cfg, net, steps)
    return Learner(net=net, optimizer=opt, scheduler=sched, scaler=rt.grad_scaler(),
                   loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
                   generator=torch.Generator().manual_seed(seed), rt=rt, frozen=frozen, model=model)


def uses_feature_cache(cfg: Train) -> bool:
    """finetune: head trains the classifier alone, so its input can be computed once (not under DDP:
    there each rank would need the cache, and a linear head gains nothing from several processes)."""
    return cfg.finetune == "head" and cfg.feature_cache and distributed.world_size() == 1


def on_features(cfg: Train, network: Network, data: TrainData, rt: Runtime, seed: int) -> tuple[nn.Module, TrainData, dict]:
    """The head to train and the cached features it trains on (pipeline/features.py)."""
    net = prepare_model(network.net, rt)
    views = features.views_of(Norm(network.config.mean, network.config.std), cfg.augment, cfg.feature_views, seed)
    feats, info = features.cached_features(net, cfg.model, data, views, cfg.batch_size * 2, rt)
    if not rt.cuda:
        # A linear layer on a batch of vectors is microseconds of work: handing it to OpenMP threads
        # costs more (measured on 2 busy cores: 0.8 ms a step on 1 thread, 9 ms on 2).
        torch.set_num_threads(1)
    return unwrap(net).get_submodule(head_name(net, cfg.model)), feats, info


def _history_csv(history: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def write_outputs(config: ModelConfig, state: TrainState, summary: dict) -> None:
    """models/model.pt (best weights + the config that rebuilds model and transforms, loadable with
    weights_only=True), reports/train.json, train_metrics.json and train_history.csv, each renamed
    into place (the loss curves were saved with the run's figures)."""
    with atomic_path(HISTORY_CSV) as tmp:
        tmp.write_text(_history_csv(state.history))
    with atomic_path(MODEL_PATH) as tmp:
        torch.save({"state_dict": state.best_state, "config": config.to_dict()}, tmp)
    write_json(TRAIN_METRICS, {k: summary[k] for k in ("best_epoch", "best_val_acc", "best_val_loss", "stopped_epoch")})
    write_json(TRAIN_JSON, summary)


def main(params: Params) -> None:
    cfg = params.train
    if distributed.is_main():
        tracking.configure(params.mlflow.experiment)  # an unreachable server fails here, before any work
    nodes = distributed.Nodes.from_env()
    if (cfg.nproc > 1 or nodes.count > 1) and not distributed.launched():
        code = distributed.relaunch(cfg.nproc, nodes, "pipeline.train", sys.argv[1:])
        if code != 0:
            raise PipelineError(f"train under torchrun ({nodes.count} node(s) x --nproc_per_node={cfg.nproc}) "
                                f"exited {code}")
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
    cfg, seed = params.train, params.base.seed
    rt = resolve_runtime(params.base.device, cfg.precision)
    if distributed.launched():
        rt = Runtime(distributed.init(rt.device), rt.amp_dtype, rt.channels_last)
    main_rank = distributed.is_main()
    data = load_train_data(rt)
    example = data.train_x[0].cpu().numpy()  # an image of the training data: the logged model's input example
    torch.manual_seed(seed)  # model initialisation and dropout, the same on every rank
    random.seed(seed)
    np.random.seed(seed)
    network = build(cfg, data.meta)
    cached = uses_feature_cache(cfg)
    if cached:
        head, data, feature_info = on_features(cfg, network, data, rt, seed)
        learner = make_learner(cfg, head, [], data, rt, seed)
        inputs: Inputs = features.cached_inputs(data.train_x.shape[1], learner.generator)  # N x views x D
    else:
        learner = make_learner(cfg, network.net, network.frozen, data, rt, seed)
        inputs = image_inputs(Norm(network.config.mean, network.config.std), cfg.augment, learner.generator)

    fp = fingerprint(params, data.meta, rt, tracking.tracking_uri(), distributed.world_size())
    ckpt_path = Path(cfg.checkpoint_dir) / CHECKPOINT_NAME
    ckpt = load_checkpoint(ckpt_path, fp, set_aside=main_rank, on_abandoned=tracking.end_abandoned_run,
                           run_exists=(lambda run_id: tracking.run_status(run_id) is not None) if main_rank else None)
    # Every rank must agree on resuming: rank 0 alone asks the tracking store.
    ckpt = ckpt if distributed.broadcast_object(ckpt is not None) else None
    state = restore(ckpt, learner) if ckpt else TrainState()
    with _run(params, state, network, data) if main_rank else contextlib.nullcontext():

        def on_epoch(s: TrainState) -> None:
            if main_rank:  # checkpoint first: a kill between the two leaves an epoch to re-log on resume
                save_checkpoint(ckpt_path, fp, s, learner)
                tracking.log_metrics(epoch_metrics(s.history[-1]), step=s.epoch)

        state, reason = fit(cfg, learner, data, inputs, state, on_epoch)
        if cached:  # the head's best weights, in the whole network: what is saved and logged
            state.best_state = features.full_state(network.net, cfg.model, state.best_state)
        if main_rank:
            summary = _finish(network.net if cached else learner.net, network.config, state, reason, example)
            if cached:
                summary.update(feature_info)
                tracking.set_tags({"train.feature_cache": feature_info["feature_cache"]})
            summary["stage_seconds"] = time.perf_counter() - started
            spent = tracking.seconds_spent()  # before end_run: a few ms more
            summary["mlflow_logging_seconds"], summary["mlflow_setup_seconds"] = spent["logging"], spent["setup"]
            write_outputs(network.config, state, summary)
    distributed.barrier()
    if main_rank:
        remove(ckpt_path)
        log.info("best epoch %d (val_acc %.4f), %s; run %s", summary["best_epoch"], summary["best_val_acc"],
                 reason, state.run_id)


@contextlib.contextmanager
def _run(params: Params, state: TrainState, network: Network, data: TrainData):
    """The stage's MLflow run: a new one, or on resume the checkpoint's, with its epochs complete."""
    tags = {**provenance.git_tags(), **provenance.dvc_exp_tags(), "data.source": redact(params.data.source),
            "dvc.prepared_md5": provenance.dvc_out_hash(str(PREPARED_DIR)), "stage": "train",
            "train.processes": distributed.world_size(), "train.nodes": distributed.Nodes.from_env().count}
    if network.weights_source:
        tags["train.weights_resolved"] = network.weights_source
    resumed = state.run_id is not None
    tracking.end_orphaned_runs(keep={state.run_id} if resumed else set())
    with tracking.run(state.run_id, run_name=run_name(params), tags=tags, system_metrics=True) as run:
        state.run_id = run.info.run_id
        tracking.claim_run()
        tracking.warm_up()
        if resumed:
            log.info("resuming MLflow run %s from epoch %d", state.run_id, state.epoch)
            _log_missing_epochs(state)
        else:
            _log_start(params, network.net, data)
        yield run


def run_name(params: Params) -> str:
    """What tells this run apart in the runs list: the model, the data, and the params it changed
    from the last commit (else the commit), after the DVC experiment's name when there is one."""
    changed = provenance.changed_params(params.flat("base", "data", "prepare", "train"))
    what = " ".join(f"{k.split('.', 1)[1]}={v}" for k, v in changed.items() if k != "data.source")
    if not what:
        commit = provenance.git_tags().get("git.commit", "none")
        what = f"@{commit[:7]}" if commit != "none" else ""
    exp = os.environ.get("DVC_EXP_NAME")
    parts = [exp + ":" if exp else "", params.train.model, data_name(params.data.source), what]
    return " ".join(p for p in parts if p)[:200]


def data_name(source: str) -> str:
    """A short name for data.source: digits, MNIST, pizza_steak_sushi, my_images."""
    if ":" in source and not source.startswith(("http://", "https://")):
        return source.split(":", 1)[1]
    path = urllib.parse.urlsplit(source).path if source.startswith(("http://", "https://")) else source
    name = PurePosixPath(path.rstrip("/")).name
    for suffix in (".tar.gz", ".tgz", ".zip", ".tar"):
        name = name.removesuffix(suffix)
    return name or redact(source)


def _log_start(params: Params, net: nn.Module, data: TrainData) -> None:
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    recorded = {**params.flat("base", "data", "prepare", "train"), "data.source": redact(params.data.source)}
    tracking.log_params({**recorded, "model.total_params": total, "model.trainable_params": trainable})
    tracking.log_dataset(PREPARED_DIR, name=redact(params.data.source), digest=data.meta.split_digest(),
                         context="training")


def _log_missing_epochs(state: TrainState) -> None:
    """Re-log epochs a kill cut off between the checkpoint and its MLflow call, and only those."""
    logged = tracking.logged_steps(state.run_id, EPOCH_KEYS["val_loss"])
    for row in state.history:
        if row["epoch"] not in logged:
            tracking.log_metrics(epoch_metrics(row), step=row["epoch"])


def _finish(net: nn.Module, config: ModelConfig, state: TrainState, reason: str, example_image) -> dict:
    """Load the best epoch's weights into `net`, log summary metrics, curves and the model (with
    `example_image`, a training image, as its input example)."""
    best = next(h for h in state.history if h["epoch"] == state.stopper["best_epoch"])
    net.load_state_dict(state.best_state)
    summary = {"run_id": state.run_id, "model": config.model, "best_epoch": best["epoch"],
               "best_val_loss": best["val_loss"], "best_val_acc": best["val_acc"],
               "stopped_epoch": state.epoch, "stop_reason": reason}
    tracking.log_metrics({k: summary[k] for k in ("best_epoch", "best_val_loss", "best_val_acc",
                                                  "stopped_epoch")})
    tracking.set_tags({"stop_reason": reason, "best_epoch": best["epoch"]})
    tracking.log_text(_history_csv(state.history), "train_history.csv")
    fig = plots.loss_curves(state.history)
    plots.save(fig, LOSS_PNG)
    plots.close(fig)
    tracking.log_artifact(LOSS_PNG)
    served = Classifier(_cpu_copy(net, config), config)
    summary["model_uri"] = tracking.log_model(served, example_image, step=best["epoch"])
    return summary


def _cpu_copy(net: nn.Module, config: ModelConfig) -> nn.Module:
    """A float32 CPU copy of the trained network for logging (no channels_last, no CUDA)."""
    cpu = build_from_config(config)
    cpu.load_state_dict({k: v.detach().cpu().float() if v.is_floating_point() else v.cpu()
                         for k, v in net.state_dict().items()})
    return cpu.eval()


if __name__ == "__main__":
    run_stage(main)
