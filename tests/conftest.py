"""Shared fixtures: a temp project (params.yaml + its own MLflow store) and tiny generated image data.

Stages run the way DVC runs them: `python -m pipeline.<stage>` in the project folder, as real
subprocesses, with PYTHONPATH pointing at this checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """One migrated MLflow sqlite store; tests copy it instead of migrating their own (seconds each)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


class Project:
    """A temp working folder laid out like the repo root, in which stages run as subprocesses."""

    def __init__(self, root: Path, mlflow_db: Path):
        self.root = root
        self.tracking_uri = f"sqlite:///{mlflow_db}"
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        (root / "data" / "sources").mkdir(parents=True)

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set(self, **values) -> None:
        """set(data__source="x", train__epochs=2): section__key=value into params.yaml."""
        p = self.params()
        for key, value in values.items():
            section, name = key.split("__", 1)
            p[section][name] = value
        (self.root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        env["TORCH_HOME"] = str(self.root / ".torch")  # never the user's hub cache
        return env

    def run(self, stage: str, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", *args], cwd=self.root,
                              env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{stage} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def path(self, rel: str) -> Path:
        return self.root / rel


@pytest.fixture
def project(tmp_path, mlflow_template) -> Project:
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    root = tmp_path / "project"
    root.mkdir()
    return Project(root, db)


def make_images(root: Path, classes=("circle", "square", "stripes"), per_class: int = 20, size: int = 24,
                split: str | None = None, seed: int = 0, fmt: str = "png") -> Path:
    """Write `per_class` learnable RGB images per class (a distinct pattern per class plus noise)
    under root/[split/]<class>/. Returns root."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for ci, cls in enumerate(classes):
        folder = root / split / cls if split else root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3))
            kind = ci % 3
            if kind == 0:
                base[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2] = 1
            elif kind == 1:
                base[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
            else:
                base[:, (xx[0] // 3) % 2 == 0] = 1
            base[..., ci % 3] *= 0.6 + 0.1 * (ci // 3)
            img = np.clip(base * 200 + rng.normal(0, 20, base.shape) + 20, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{cls}_{i:03d}.{fmt}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A small train/test image folder (3 classes) in the pizza_steak_sushi layout."""
    root = tmp_path / "images"
    make_images(root, split="train", per_class=20)
    make_images(root, split="test", per_class=6, seed=1)
    return root
