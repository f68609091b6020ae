"""Reading what train writes (reports, models/model.pt, checkpoints) while it runs and after."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from torch import nn

from helpers.processes import Background, poll

from pipeline.train import EPOCH_KEYS  # noqa: E402  the history columns -> their keys in MLflow

EPOCH_METRICS = tuple(EPOCH_KEYS)  # the history columns, logged once per epoch
LEARNED = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")  # history columns that must reproduce


def history(project) -> list[dict[str, float]]:
    with open(project.path("reports/train_history.csv"), newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def summary(project) -> dict:
    return json.loads(project.path("reports/train.json").read_text())


def model_pt(project) -> dict:
    return torch.load(project.path("models/model.pt"), map_location="cpu", weights_only=True)


def rebuild(saved: dict) -> nn.Module:
    """The network models/model.pt describes, with its weights, in eval mode."""
    from pipeline.models import ModelConfig, build_from_config

    net = build_from_config(ModelConfig.from_dict(saved["config"]))
    net.load_state_dict(saved["state_dict"])
    return net.eval()


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def read_checkpoint(path: Path) -> dict | None:
    """What train's read_checkpoint reads there (checksum checked), or None: absent or damaged."""
    from pipeline.checkpoint import read_checkpoint as read

    try:
        return read(path)
    except (FileNotFoundError, ValueError, RuntimeError, EOFError, OSError):
        return None


class CheckpointWatch:
    """Reads a train checkpoint each time the file is replaced (atomically, so each version read is
    whole), for tests that wait for a given epoch while train runs."""

    def __init__(self, path: Path):
        self.path, self.seen = path, None

    def at_least(self, epoch: int) -> dict | None:
        """The checkpoint if it is a new version holding epoch >= `epoch`, else None."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        if (st.st_ino, st.st_mtime_ns) == self.seen:
            return None
        self.seen = (st.st_ino, st.st_mtime_ns)
        ckpt = read_checkpoint(self.path)
        return ckpt if ckpt and ckpt["epoch"] >= epoch else None


def wait_for_checkpoint(project, bg: Background, epoch: int, timeout: float = 300) -> dict:
    """The train checkpoint once it holds epoch >= `epoch`, while `bg` runs (a damaged version read
    is skipped)."""
    watch = CheckpointWatch(project.checkpoint())
    return poll(lambda: watch.at_least(epoch), f"checkpoint of epoch {epoch}", timeout, bg, interval=0.002)


def toy_epoch(rt, seed: int = 0, n: int = 12, size: int = 8, hidden: int = 4, batch: int = 4):
    """One epoch of a small batch-norm TinyVGG on `n` random `size`-px images under the runtime `rt`;
    returns (net, its state before, the epoch's metrics, the Learner)."""
    from pipeline.engine import Learner, evaluate, train_one_epoch
    from pipeline.models import build_model
    from pipeline.runtime import place, prepare_model
    from pipeline.transforms import Norm, eval_transforms

    torch.manual_seed(seed)
    net = prepare_model(build_model("tinyvgg", 3, 1, size, hidden_units=hidden, batch_norm=True, dropout=0.0), rt)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    learner = Learner(net=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), scheduler=None,
                      scaler=rt.grad_scaler(), loss_fn=nn.CrossEntropyLoss(), generator=g, rt=rt)
    net.train()
    tf = eval_transforms(Norm((0.5,), (0.25,)))
    x, y = place(x, rt), y.to(rt.device)
    m = train_one_epoch(learner, x, y, tf, batch)
    m.update(evaluate(net, x, y, tf, 2 * batch, rt))
    return net, before, m, learner
