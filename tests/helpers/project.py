"""Temp projects the tests run stages in, built from this checkout's committed files.

- `Project`: a working folder with params.yaml and a `data/sources/` folder, its MLflow store in a
  sqlite file beside it; stages run as `python -m pipeline.<stage>` subprocesses with PYTHONPATH
  pointing at this checkout, the way DVC runs them.
- `Repo`: a Project that is also a git + DVC repo holding this checkout's files, its MLflow store the
  project's own `mlflow.db`; for `dvc repro`, `dvc exp`, `make` targets and MLproject runs.

params.yaml comes from git's index (`git show :params.yaml`: the committed file plus what is staged),
never from the working tree, so a `dvc exp run -S ...` in the checkout, which rewrites the working
params.yaml, changes no test. After adding a key to params.yaml, `git add` it before running tests.
Params are changed in one way only: `set(section__key=value, ...)`, and the fast settings below are
written the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from helpers.images import make_images

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# A fast pipeline: builtin digits at 8x8, a narrow TinyVGG, three epochs (seconds on a CPU).
EVAL_FAST = dict(prepare__image_size=8, train__hidden_units=8, train__epochs=3)
# A fast train stage with every source of randomness on (all three augmentations, dropout, onecycle
# schedule): 72 learnable images of 3 classes prepared at 12 px, a narrow TinyVGG, 6 epochs, no early
# stopping. Runs in seconds on a CPU; most of them is interpreter start-up and MLflow.
TRAIN_FAST = dict(prepare__image_size=12, train__hidden_units=8, train__dropout=0.1, train__epochs=6,
                  train__batch_size=16, train__augment=["flip", "crop", "trivialaugment"], train__patience=100)
# The whole pipeline in seconds, for the DVC repos (a generated image folder as the source).
REPO_FAST = dict(prepare__image_size=8, prepare__min_images_per_class=3, train__epochs=2, train__hidden_units=4,
                 train__batch_size=32, train__patience=2)
# The same with enough epochs to interrupt (no early stopping: patience > epochs).
FAULT_FAST = {**REPO_FAST, "train__epochs": 8, "train__patience": 100}


def committed(rel: str) -> str:
    """File `rel` of this checkout as git's index holds it (the working tree's outside a git checkout)."""
    proc = subprocess.run(["git", "show", f":{rel}"], cwd=REPO, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else (REPO / rel).read_text()


def committed_params(overrides: dict[str, str] | None = None):
    """The committed params.yaml (see `committed`), loaded and validated, with `overrides` as a stage takes them."""
    from pipeline.config import load_params

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(committed("params.yaml"))
        return load_params(path, overrides)


def write_params(path: Path, **values) -> None:
    """`section__key=value` pairs into the params.yaml at `path`."""
    if not values:
        return
    params = yaml.safe_load(path.read_text())
    for key, value in values.items():
        section, name = key.split("__", 1)
        params[section][name] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def sh(cmd: list[str], cwd: Path, env: dict, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def ran_stages(output: str) -> set[str]:
    """The stages `dvc repro` / `dvc exp run` ran, from its output."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


class Project:
    """A temp working folder laid out like the repo root, in which stages run as subprocesses."""

    def __init__(self, root: Path, tracking_uri: str, env: dict[str, str]):
        self.root, self.tracking_uri, self._env = root, tracking_uri, env

    @classmethod
    def create(cls, base: Path, mlflow_template: Path | None = None, **params) -> "Project":
        """A project at `base`/project with the committed params.yaml plus `params`, its MLflow store at
        `base`/mlflow.db (a copy of the migrated `mlflow_template`; none for the data stages, which
        never open MLflow)."""
        root = base / "project"
        (root / "data" / "sources").mkdir(parents=True)
        (root / "params.yaml").write_text(committed("params.yaml"))
        if mlflow_template is not None:
            shutil.copy(mlflow_template, base / "mlflow.db")
        project = cls(root, f"sqlite:///{base / 'mlflow.db'}", {})
        project.set(**params)
        return project

    def env(self) -> dict:
        env = {**os.environ, **self._env}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
        env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        env["TORCH_HOME"] = str(self.root / ".torch")  # never the user's hub cache
        return env

    def path(self, rel: str) -> Path:
        return self.root / rel

    def params(self) -> dict:
        return yaml.safe_load(self.path("params.yaml").read_text())

    def set(self, **values) -> None:
        """set(data__source="x", train__epochs=2): section__key=value into params.yaml."""
        write_params(self.path("params.yaml"), **values)

    def checkpoint(self) -> Path:
        return self.path(self.params()["train"]["checkpoint_dir"]) / "train.pt"

    def run(self, stage: str, *args: str, check: bool = True, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """`python -m pipeline.<stage>` as dvc.yaml runs it, in the foreground."""
        proc = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", *args], cwd=self.root,
                              env={**self.env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{stage} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self, *cmd: str, env: dict | None = None):
        """A command in the background, in a session of its own (helpers.processes.Background)."""
        from helpers.processes import Background

        log = self.root.parent / f"{self.root.name}-{time.monotonic_ns()}.log"
        return Background(list(cmd), self.root, {**self.env(), **(env or {})}, log)

    def start_stage(self, stage: str, env: dict | None = None):
        return self.start(sys.executable, "-m", f"pipeline.{stage}", env=env)

    def call(self, func):
        """`func(params)` in this process with the project as the working folder: a stage's work
        function (fetch, prepare) without the second of interpreter and torch start-up a subprocess
        costs. PipelineErrors propagate, for the test to read the message run_stage would print."""
        from pipeline.config import load_params

        with contextlib.chdir(self.root):
            return func(load_params("params.yaml"))

    def clone(self, base: Path, own_artifacts: bool = False) -> "Project":
        """A copy at `base`/project (files and MLflow store), to change without touching this one.

        The copied store still names this project's artifact folders (MLflow stores absolute paths),
        so artifacts are shared: clones add to them (new runs get new folders) but never delete any.
        `own_artifacts`: the clone gets a copy of them, for a test that changes artifacts."""
        base.mkdir(parents=True, exist_ok=True)
        root = base / "project"
        shutil.copytree(self.root, root, symlinks=True, ignore=shutil.ignore_patterns("mlruns"))
        if not self.tracking_uri.startswith("sqlite:///"):  # a server: the clone uses it too
            return type(self)(root, self.tracking_uri, self._env)
        db = self._db()
        new_db = base / "mlflow.db" if db.parent != self.root else root / "mlflow.db"
        if db.parent != self.root:
            shutil.copy(db, new_db)
        clone = type(self)(root, f"sqlite:///{new_db}", self._env)
        if own_artifacts:
            _move_artifacts(new_db, root / "mlruns")
        return clone

    # MLflow (the project's sqlite store)
    def _db(self) -> Path:
        return Path(self.tracking_uri.removeprefix("sqlite:///").split("?")[0])

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def runs(self) -> list:
        c = self.client()
        exp = c.get_experiment_by_name(self.params()["mlflow"]["experiment"])
        return c.search_runs([exp.experiment_id]) if exp else []

    def champion_version(self) -> str | None:
        """@champion's version, read straight from the store (no MLflow client: works while a stage runs)."""
        import sqlite3

        name = self.params()["mlflow"]["registered_model"]
        with sqlite3.connect(f"file:{self._db()}?mode=ro", uri=True, timeout=30) as con:
            row = con.execute("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = 'champion'",
                              (name,)).fetchone()
        return str(row[0]) if row else None

    def epoch_steps(self, run_id: str, key: str = "loss/val") -> list[int]:
        return sorted(m.step for m in self.client().get_metric_history(run_id, key))


class Repo(Project):
    """A git + DVC repo holding this checkout's files: the tracked ones, and untracked ones git does
    not ignore (work in progress is tested as it is), with the committed params.yaml, without
    dvc.lock (the repo reproduces its own), and a generated image folder as data.source. Its MLflow
    store is its own sqlite:///mlflow.db, as for a user's clone; stages, `dvc` and `make` run with
    the checkout's venv first on PATH."""

    @classmethod
    def create(cls, root: Path, mlflow_template: Path | None = None, images: bool = True, **params) -> "Repo":
        """`images`: data.source is a generated image folder (12 per class, 12 px) under data/sources/;
        else the committed source (builtin:digits)."""
        from tools.checkout import copy_checkout

        copy_checkout(root, committed("params.yaml"))
        for rel in ("pipeline", "dvc.yaml", "Makefile", ".dvc/config", "data/sources/README.md"):
            assert (root / rel).exists(), f"{rel} is not in the checkout"
        if images:
            make_images(root / "data/sources/images", per_class=12, size=12)
            params = {"data__source": "data/sources/images", **params}
        if mlflow_template is not None:
            shutil.copy(mlflow_template, root / "mlflow.db")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the repo's own store
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
        env["PYTHONPATH"] = str(root)
        env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "test"
        env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@example.com"
        env["DVC_NO_ANALYTICS"] = "1"
        env["DVC_SITE_CACHE_DIR"] = str(root.parent / "dvc-site-cache")  # not the machine's /var/tmp/dvc
        repo = cls(root, f"sqlite:///{root / 'mlflow.db'}", env)
        repo.set(**params)
        repo.commit("test data and params")
        return repo

    def env(self) -> dict:
        return dict(self._env)

    def clone(self, dest: Path) -> "Repo":
        """A copy (git, DVC cache and lock, MLflow store, outputs) to change freely. Its MLflow store
        names this repo's mlruns/ for artifacts (absolute paths): clones add runs there, never remove."""
        shutil.copytree(self.root, dest, symlinks=True, ignore=shutil.ignore_patterns("mlruns"))
        return Repo(dest, f"sqlite:///{dest / 'mlflow.db'}", {**self._env, "PYTHONPATH": str(dest)})

    @property
    def db(self) -> Path:
        return self._db()

    def lock(self) -> bytes:
        return self.path("dvc.lock").read_bytes()

    def lock_stage(self, stage: str) -> dict | None:
        return (yaml.safe_load(self.lock()) or {}).get("stages", {}).get(stage)

    def cached_dir(self, stage: str, out: str) -> dict[str, str]:
        """{relpath: md5} of output folder `out` of `stage` per dvc.lock, read from the DVC cache's
        .dir manifest; asserts every file's object is in the cache with the working file's bytes."""
        (entry,) = [o for o in self.lock_stage(stage)["outs"] if o["path"] == out]
        md5 = entry["md5"]
        assert md5.endswith(".dir")
        cache = self.path(".dvc/cache/files/md5")
        manifest = json.loads((cache / md5[:2] / md5[2:]).read_text())
        files = {item["relpath"]: item["md5"] for item in manifest}
        for rel, digest in files.items():
            obj = cache / digest[:2] / digest[2:]
            assert obj.is_file(), f"{out}/{rel} is not in the DVC cache"
            assert obj.read_bytes() == self.path(out).joinpath(rel).read_bytes()
        return files

    def git(self, *args: str) -> subprocess.CompletedProcess:
        return sh(["git", *args], self.root, self._env)

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)

    def dvc(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return sh(["dvc", *args], self.root, self._env, check=check, timeout=timeout)

    def start_dvc(self, *args: str, env: dict | None = None):
        return self.start("dvc", *args, env=env)


def _move_artifacts(db: Path, dest: Path) -> None:
    """Copy the artifact folders store `db` names to `dest` and point the store there."""
    import sqlite3

    with sqlite3.connect(db) as con:
        roots = {r[0] for r in con.execute("SELECT artifact_location FROM experiments")
                 if r[0] and r[0].startswith("file://") and Path(r[0].removeprefix("file://")).is_dir()}
        assert len(roots) <= 1, roots
        for old in roots:
            shutil.copytree(old.removeprefix("file://"), dest)
            for table, in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                columns = [c[1] for c in con.execute(f"PRAGMA table_info('{table}')") if "CHAR" in c[2].upper()
                           or "TEXT" in c[2].upper()]
                for column in columns:
                    for before, after in ((old, dest.as_uri()), (old.removeprefix("file://"), str(dest))):
                        con.execute(f'UPDATE "{table}" SET "{column}" = REPLACE("{column}", ?, ?) '
                                    f'WHERE "{column}" LIKE ?', (before, after, f"%{before}%"))


@contextlib.contextmanager
def inside_project(project: Project):
    """Run pipeline code in this process as if in `project`: its folder as the working directory and
    its MLflow store as the tracking URI. Undoes MLflow's process-wide state afterwards (the URI and
    experiment it keeps in globals and in os.environ), so other tests see none of it."""
    import mlflow
    import mlflow.tracking._tracking_service.utils as tracking_utils
    from mlflow.tracking import fluent

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
    saved_env = {k: os.environ.get(k) for k in keys}
    saved = (tracking_utils._tracking_uri, fluent._active_experiment_id, os.getcwd())
    os.environ["MLFLOW_TRACKING_URI"] = project.tracking_uri
    for k in keys[1:]:
        os.environ.pop(k, None)
    mlflow.set_tracking_uri(project.tracking_uri)
    os.chdir(project.root)
    try:
        yield project
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run("FAILED")
        os.chdir(saved[2])
        mlflow.set_tracking_uri(saved[0])
        fluent._active_experiment_id = saved[1]
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepared_project(base: Path, mlflow_template: Path, make_source, **params) -> Project:
    """A Project at `base` with `make_source(folder)` as data.source (under data/sources/src),
    `params` set, and fetch_data + prepare already run (in this process)."""
    from pipeline.fetch_data import fetch
    from pipeline.prepare import prepare

    project = Project.create(base, mlflow_template, data__source="data/sources/src", **params)
    make_source(project.path("data/sources/src"))
    project.call(fetch)
    project.call(prepare)
    return project


def copy_prepared(src: Project, base: Path, mlflow_template: Path, **params) -> Project:
    """A fresh Project at `base` (own, empty MLflow store) with `src`'s params.yaml and data/prepared,
    plus `params`: ready to train without fetching or preparing again."""
    project = Project.create(base, mlflow_template)
    shutil.copy(src.path("params.yaml"), project.path("params.yaml"))
    shutil.copytree(src.path("data/prepared"), project.path("data/prepared"))
    project.set(**params)
    return project
