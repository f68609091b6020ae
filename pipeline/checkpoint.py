"""Per-epoch resume checkpoints of the train stage (train.checkpoint_dir/train.pt).

A checkpoint holds the TrainState, the weights, optimizer, scheduler, grad scaler and every random
generator's state, so a resumed run ends with the same weights and metrics as an uninterrupted one.
Its first line carries the payload's sha256; its fingerprint names the params, data, device type and
MLflow store it belongs to. A checkpoint that is damaged or belongs elsewhere (other params or data,
another store, a run that no longer exists there) is set aside, never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.config import Params
from pipeline.dataset import DatasetMeta
from pipeline.engine import Learner, TrainState
from pipeline.io import atomic_path
from pipeline.runtime import Runtime

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "train.pt"
MAGIC = b"pipeline-checkpoint sha256="  # the first line; the torch.save payload follows


def fingerprint(params: Params, meta: DatasetMeta, rt: Runtime, store: str, world: int) -> str:
    """What a checkpoint must match to be resumed: seed, train params, data, device type, the number
    of processes (each epoch's shards depend on it) and the tracking store its MLflow run lives in."""
    key = {"params": params.flat("base", "train"), "data": meta.to_json()["splits"], "device": rt.device.type,
           "store": store, "world": world}
    key["params"].pop("train.checkpoint_dir")
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def save_checkpoint(path: Path, fp: str, state: TrainState, learner: Learner) -> None:
    sched = learner.scheduler
    ckpt = {
        "fingerprint": fp, "epoch": state.epoch, "history": state.history, "run_id": state.run_id,
        "best_state": state.best_state, "stopper": state.stopper,
        "model": learner.net.state_dict(), "optimizer": learner.optimizer.state_dict(),
        "scheduler": sched.state_dict() if sched else None, "scaler": learner.scaler.state_dict(),
        "rng": {"generator": learner.generator.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": np.random.get_state(), "python": random.getstate()},
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    payload = buf.getbuffer()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
        f.write(payload)


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's content, after checking its sha256: torch.load alone accepts a file whose
    tensor bytes changed on disk, and training would resume from the damaged weights silently."""
    data = memoryview(path.read_bytes())
    head_end = bytes(data[:len(MAGIC) + 65]).find(b"\n")
    head = bytes(data[:head_end]) if head_end > 0 else b""
    if not head.startswith(MAGIC):
        raise ValueError("no checksum header (not written by this version of train)")
    payload = data[head_end + 1:]
    if hashlib.sha256(payload).hexdigest() != head[len(MAGIC):].decode(errors="replace"):
        raise ValueError("sha256 mismatch: the file changed after it was written")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


def load_checkpoint(path: Path, fp: str, set_aside: bool = True,
                    on_abandoned: Callable[[str, str], None] | None = None,
                    run_exists: Callable[[str], bool] | None = None) -> dict | None:
    """The checkpoint at `path` if it is intact, belongs to this configuration and (`run_exists`) its
    MLflow run is still there; any other is set aside (renamed *.stale, *.stale1, ...; by rank 0
    alone under DDP) rather than used, and `on_abandoned(run_id, why)` is called for the run it was
    resuming."""
    if not path.exists():
        return None
    ckpt = None
    try:
        ckpt = read_checkpoint(path)
        ok = ckpt.get("fingerprint") == fp
        reason = "params, data or tracking store changed"
        if ok and run_exists is not None and not run_exists(ckpt["run_id"]):
            ok, reason = False, (f"its MLflow run {ckpt['run_id']} is not in the tracking store (deleted, "
                                 "or another store)")
            ckpt = None  # nothing to mark KILLED: the run is not there
    except Exception as e:  # a damaged file: a checksum mismatch, unpickling errors of many kinds
        ok, reason = False, f"unreadable: {e}"
    if not ok:
        if set_aside:
            stale = _free_name(path.with_suffix(".stale"))
            path.replace(stale)
            reason += f"; kept as {stale.name}"
            if ckpt and ckpt.get("run_id") and on_abandoned is not None:
                on_abandoned(ckpt["run_id"], f"its checkpoint was set aside: {reason}")
        log.warning("not resuming from %s (%s); starting afresh", path, reason)
        return None
    return ckpt


def checkpoint_runs(checkpoint_dir: str) -> set[str]:
    """The MLflow run of the resumable checkpoint in `checkpoint_dir`, if any: a killed train's
    RUNNING run that the next train resumes, not an orphan."""
    try:
        return {read_checkpoint(Path(checkpoint_dir) / CHECKPOINT_NAME)["run_id"]}
    except (OSError, ValueError, KeyError, RuntimeError, EOFError):
        return set()


def _free_name(path: Path) -> Path:
    """`path`, or path1, path2, ... when taken: an earlier set-aside checkpoint is not overwritten."""
    n, free = 0, path
    while free.exists():
        n += 1
        free = path.with_name(f"{path.name}{n}")
    return free


def restore(ckpt: dict, learner: Learner) -> TrainState:
    """Load the checkpoint into the learner and the process's random generators; its TrainState."""
    learner.net.load_state_dict(ckpt["model"])
    learner.optimizer.load_state_dict(ckpt["optimizer"])
    if learner.scheduler is not None:
        learner.scheduler.load_state_dict(ckpt["scheduler"])
    learner.scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    learner.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return TrainState(epoch=ckpt["epoch"], history=ckpt["history"], best_state=ckpt["best_state"],
                      stopper=ckpt["stopper"], run_id=ckpt["run_id"])
