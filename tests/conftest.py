"""Shared fixtures: a temp project (params.yaml + its own MLflow store) and tiny generated image data.

Stages run the way DVC runs them: `python -m pipeline.<stage>` in the project folder, as real
subprocesses, with PYTHONPATH pointing at this checkout.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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

    def call(self, func):
        """`func(params)` in this process with the project as the working folder: a stage's work
        function (fetch, prepare) without the second of interpreter and torch start-up a subprocess
        costs. PipelineErrors propagate, for the test to read the message run_stage would print."""
        from pipeline.config import load_params

        old = os.getcwd()
        os.chdir(self.root)
        try:
            return func(load_params("params.yaml"))
        finally:
            os.chdir(old)

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


# -- shared by the data tests (fetch_data, archives, prepare, dvc) --------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256 of content} of every file under `root` (symlinks as their target), to
    prove a failed stage left a tree exactly as it was."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def raw_state(project: "Project") -> tuple[dict[str, str], bytes]:
    """data/raw's tree and data/raw.json's bytes: what a failed fetch_data must leave untouched."""
    return snapshot(project.path("data/raw")), project.path("data/raw.json").read_bytes()


def leftovers(folder: Path) -> list[str]:
    """Temp files or folders (`.<name>.tmp-*`, `.<name>.old-*`) a stage left behind in `folder`."""
    return sorted(p.name for p in folder.glob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def files_of(root: Path, prefix: str = "") -> dict[str, bytes]:
    """{prefix + relative path: bytes} of the files under `root`, as archive members."""
    return {prefix + p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_zip(path: Path, members: dict, compression=zipfile.ZIP_DEFLATED) -> Path:
    """Write a zip of {name or ZipInfo: bytes}."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            if isinstance(name, zipfile.ZipInfo):
                name.compress_type = compression
            zf.writestr(name, data)
    return path


def write_tar(path: Path, members: dict, mode: str = "w:gz") -> Path:
    """Write a tar of {name: bytes} or {TarInfo: bytes | None} (None for links and special files)."""
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


class LoopbackServer:
    """A real HTTP server on 127.0.0.1 (a free port), serving each route with a behaviour:

    ok        200 with the body
    truncated declares a Content-Length larger than the body, sends the body, then closes
    reset     sends half the body, then resets the connection (RST)
    stall     sends half the body, then goes silent until the test ends
    silent    accepts the request and never answers
    error     500 Internal Server Error
    Anything not routed is a 404. `requests` lists the paths asked for, in order.
    """

    def __init__(self):
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.requests: list[str] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                mode, body = server.routes.get(self.path, ("missing", b""))
                if mode == "missing":
                    self.send_error(404, "Not Found")
                    return
                if mode == "error":
                    self.send_error(500, "Internal Server Error")
                    return
                if mode == "silent":
                    server.release.wait(60)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body) + (4096 if mode == "truncated" else 0)))
                self.end_headers()
                if mode in ("ok", "truncated"):
                    self.wfile.write(body)
                    return
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if mode == "stall":
                    server.release.wait(60)
                elif mode == "reset":
                    time.sleep(0.2)  # let the client get into the body first
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.rfile.close()  # drop the makefile reference so close() really closes: RST
                    self.connection.close()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def serve(self, path: str, body: bytes = b"", mode: str = "ok") -> str:
        self.routes[path] = (mode, body)
        return self.url(path)

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server():
    server = LoopbackServer()
    yield server
    server.close()


@pytest.fixture
def offline(monkeypatch):
    """Stage subprocesses cannot reach the internet: every proxied request goes to a closed loopback
    port, while 127.0.0.1 (the tests' own servers) stays direct."""
    with socket.socket() as s:  # a port that was free a moment ago, and nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{port}")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


class CheckpointWatch:
    """Reads a train checkpoint each time the file is replaced (atomically, so each version read is
    whole), for tests that wait for a given epoch while train runs. `read`: the reader to use
    (train.read_checkpoint, or one that returns None for a damaged file)."""

    def __init__(self, path: Path, read):
        self.path, self.read, self.seen = path, read, None

    def at_least(self, epoch: int) -> dict | None:
        """The checkpoint if it is a new version holding epoch >= `epoch`, else None."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        if (st.st_ino, st.st_mtime_ns) == self.seen:
            return None
        self.seen = (st.st_ino, st.st_mtime_ns)
        ckpt = self.read(self.path)
        return ckpt if ckpt and ckpt["epoch"] >= epoch else None


# -- shared by the evaluate, promotion, predict and MLproject tests --------------------------------

import contextlib as _contextlib  # noqa: E402  (appended section)

# A fast pipeline: builtin digits at 8x8, a narrow TinyVGG, three epochs (seconds on a CPU).
EVAL_FAST = dict(prepare__image_size=8, train__hidden_units=8, train__epochs=3)


def clone_project(src: Project, dest: Path) -> Project:
    """A copy of `src` (files and MLflow database) at `dest`, to change without touching `src`.

    The copied database still names `src`'s artifact folders (MLflow stores them as absolute paths),
    so artifacts are shared: clones add to them (new runs get new folders) but never delete any."""
    dest.mkdir(parents=True, exist_ok=True)
    db = dest / "mlflow.db"
    shutil.copy(Path(src.tracking_uri.removeprefix("sqlite:///")), db)
    root = dest / "project"
    shutil.copytree(src.root, root, ignore=shutil.ignore_patterns("mlruns"))
    clone = Project.__new__(Project)
    clone.root, clone.tracking_uri = root, f"sqlite:///{db}"
    return clone


@pytest.fixture(scope="session")
def eval_trained(tmp_path_factory, mlflow_template) -> Project:
    """fetch_data, prepare and train run once (EVAL_FAST); not yet evaluated. Read-only: tests
    clone_project() it before changing anything."""
    base = tmp_path_factory.mktemp("eval-trained")
    shutil.copy(mlflow_template, base / "mlflow.db")
    (base / "project").mkdir()
    project = Project(base / "project", base / "mlflow.db")
    project.set(**EVAL_FAST)
    for stage in ("fetch_data", "prepare", "train"):
        project.run(stage)
    return project


@pytest.fixture(scope="session")
def eval_done(eval_trained, tmp_path_factory) -> Project:
    """eval_trained plus one evaluate: with no champion yet its model became version 1 @champion.
    Read-only, like eval_trained."""
    project = clone_project(eval_trained, tmp_path_factory.mktemp("eval-done"))
    project.run("evaluate")
    return project


@_contextlib.contextmanager
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


def image_tree(root: Path, split: bool = True) -> Path:
    """A small source: train/<class>/* (8 per class) + test/<class>/* (3), or <class>/* (8); 16 px."""
    if split:
        make_images(root, split="train", per_class=8, size=16)
        make_images(root, split="test", per_class=3, size=16, seed=1)
    else:
        make_images(root, per_class=8, size=16)
    return root


@pytest.fixture
def data_project(tmp_path) -> Project:
    """A Project for the data stages alone (fetch_data, prepare), which never open MLflow: it skips
    the migrated MLflow store, whose one-off creation costs seconds."""
    root = tmp_path / "project"
    root.mkdir()
    return Project(root, tmp_path / "mlflow.db")


@pytest.fixture
def fetched(data_project) -> Project:
    """A project whose data/raw came from a good fetch of a local folder under data/sources/ (24
    images, 3 classes), with data.timeout_s 0.5: the baseline a failing fetch must leave alone."""
    from pipeline.fetch_data import fetch

    image_tree(data_project.path("data/sources/good"), split=False)
    data_project.set(data__source="data/sources/good", data__timeout_s=0.5)
    data_project.call(fetch)
    assert len(files_of(data_project.path("data/raw"))) == 24
    return data_project


def assert_failed_cleanly(project: Project, proc: subprocess.CompletedProcess, before, *texts: str) -> None:
    """A stage run exited 1 with one clear error line holding `texts` (no traceback), and left
    data/raw + data/raw.json as `before` (raw_state) with no temp folders behind."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for text in texts:
        assert text in proc.stderr, f"{text!r} not in:\n{proc.stderr}"
    assert raw_state(project) == before
    assert leftovers(project.path("data")) == []


def fetch_fails(project: Project, *texts: str) -> str:
    """fetch raises a PipelineError (what run_stage prints) holding `texts`, and leaves data/raw +
    data/raw.json exactly as they were, with no temp folders behind. Returns the message."""
    from pipeline.config import PipelineError
    from pipeline.fetch_data import fetch

    before = raw_state(project)
    with pytest.raises(PipelineError) as err:
        project.call(fetch)
    message = str(err.value)
    for text in texts:
        assert text in message, f"{text!r} not in: {message}"
    assert raw_state(project) == before
    assert leftovers(project.path("data")) == []
    return message


# -- shared by the train tests (test_train.py, test_resume.py) -------------------------------------

# A fast train stage with every source of randomness on (all three augmentations, dropout, onecycle
# schedule): 72 learnable images of 3 classes prepared at 12 px, a narrow TinyVGG, 6 epochs, no early
# stopping. Runs in seconds on a CPU; most of them is interpreter start-up and MLflow.
TRAIN_FAST = dict(prepare__image_size=12, train__hidden_units=8, train__dropout=0.1, train__epochs=6,
                  train__batch_size=16, train__augment=["flip", "crop", "trivialaugment"],
                  train__patience=100)


def noise_images(root: Path, classes=("a", "b", "c"), per_class: int = 16, size: int = 12, seed: int = 0) -> Path:
    """Random-pixel images in class folders: nothing to learn, so a model that memorises the train
    split only gets worse on val (val_loss stops improving within a few epochs)."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / cls / f"{i:03d}.png")
    return root


def prepared_project(base: Path, mlflow_template: Path, make_source, **params) -> Project:
    """A Project at `base`/project with its own MLflow store, `make_source(folder)` as data.source
    (under data/sources/src), `params` set, and fetch_data + prepare already run (in this process)."""
    from pipeline.fetch_data import fetch
    from pipeline.prepare import prepare

    base.mkdir(parents=True, exist_ok=True)
    shutil.copy(mlflow_template, base / "mlflow.db")
    (base / "project").mkdir()
    project = Project(base / "project", base / "mlflow.db")
    make_source(project.path("data/sources/src"))
    project.set(data__source="data/sources/src", **params)
    project.call(fetch)
    project.call(prepare)
    return project


def copy_prepared(src: Project, base: Path, mlflow_template: Path, **params) -> Project:
    """A fresh Project at `base`/project (own, empty MLflow store) with `src`'s params.yaml and
    data/prepared, plus `params`: ready to train without fetching or preparing again."""
    base.mkdir(parents=True, exist_ok=True)
    shutil.copy(mlflow_template, base / "mlflow.db")
    (base / "project").mkdir()
    project = Project(base / "project", base / "mlflow.db")
    shutil.copy(src.path("params.yaml"), project.path("params.yaml"))
    shutil.copytree(src.path("data/prepared"), project.path("data/prepared"))
    if params:
        project.set(**params)
    return project


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, mlflow_template) -> Project:
    """Prepared TRAIN_FAST data (not trained). Read-only: tests copy_prepared() it."""
    return prepared_project(tmp_path_factory.mktemp("train-data"), mlflow_template,
                            lambda folder: make_images(folder, per_class=24, size=16), **TRAIN_FAST)


@pytest.fixture(scope="session")
def train_reference(train_data, tmp_path_factory, mlflow_template) -> Project:
    """One uninterrupted train run on train_data with TRAIN_FAST: what reproduced and resumed runs
    must equal, and whose MLflow run the tracking tests read. Read-only."""
    project = copy_prepared(train_data, tmp_path_factory.mktemp("train-reference"), mlflow_template)
    project.run("train")
    return project


# -- temp git + DVC repos made from this checkout (test_retrain, test_dvc_remote) --------------------

VENV_BIN = Path(sys.executable).parent
FAST = {  # the whole pipeline in seconds
    "prepare": {"image_size": 8, "min_images_per_class": 3},
    "train": {"epochs": 2, "hidden_units": 4, "batch_size": 32, "patience": 2},
}


def sh(cmd: list[str], cwd: Path, env: dict, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def build_repo(root: Path, mlflow_template: Path, fast: dict) -> dict:
    """A git + DVC repo at `root` holding this checkout's files (tracked ones, and untracked ones git
    does not ignore: what the next commit would hold), `fast`'s params and a local image-folder source
    under data/sources/. Returns the environment to run its commands in."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if rel.startswith("tests/") or rel == "dvc.lock" or not (REPO / rel).is_file():
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    for rel in ("pipeline", "params.yaml", "dvc.yaml", "Makefile", ".dvc/config", "data/sources/README.md"):
        assert (root / rel).exists(), f"{rel} is not in the checkout"
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in fast.items():
        params[section].update(values)
    params["data"]["source"] = "data/sources/images"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    make_images(root / "data/sources/images", per_class=12, size=12)
    shutil.copy(mlflow_template, root / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the repo's own sqlite store
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(root)
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@example.com"
    sh(["git", "init", "-q", "-b", "main"], root, env)
    commit_all(root, env, "init")
    return env


@pytest.fixture
def repo(tmp_path, mlflow_template):
    """A temp git + DVC repo (build_repo) with FAST params. Returns (root, env)."""
    root = tmp_path / "repo"
    return root, build_repo(root, mlflow_template, FAST)


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def commit_all(root: Path, env: dict, message: str) -> None:
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", message], root, env)


