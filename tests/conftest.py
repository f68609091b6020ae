"""Fixtures. The helpers they build on live in tests/helpers/ (plain modules, imported by the tests
as `helpers.<module>`); session-scoped fixtures are read-only: tests clone them before changing
anything."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from helpers import fault_report
from helpers.archives import files_of
from helpers.http import LoopbackServer
from helpers.images import image_tree, make_images
from helpers.project import (
    EVAL_FAST,
    FAULT_FAST,
    REPO_FAST,
    TRAIN_FAST,
    Project,
    Repo,
    copy_prepared,
    prepared_project,
    ran_stages,
)


def pytest_sessionstart(session):
    fault_report.start_session(is_worker=hasattr(session.config, "workerinput"))


# The modules whose tests take longest in all (1 to 6 minutes each on 2 cores, `--durations=0`), longest
# first. Collected first, they are the first modules the xdist workers take (`make test`:
# --no-loadscope-reorder), so the two workers end together instead of one running a long module alone
# at the end.
LONGEST_MODULES = ("test_retrain.py", "faults/test_tracking_faults.py", "test_ddp.py", "test_postgres.py",
                   "faults/test_promotion_faults.py", "test_server.py", "test_train.py",
                   "faults/test_interruptions.py", "test_promotion.py", "test_resume.py", "faults/test_corruption.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        rel = item.nodeid.split("::", 1)[0].removeprefix("tests/")
        return LONGEST_MODULES.index(rel) if rel in LONGEST_MODULES else len(LONGEST_MODULES)

    items.sort(key=rank)  # stable: each module's tests keep their order


def pytest_sessionfinish(session, exitstatus):
    """The fault suite's report (helpers/fault_report.py), merged over pytest-xdist's workers."""
    worker = getattr(session.config, "workerinput", {}).get("workerid")
    fault_report.finish_session(worker, session.config._tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    """One migrated MLflow sqlite store; tests copy it instead of migrating their own (seconds each)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def project(tmp_path, mlflow_template) -> Project:
    return Project.create(tmp_path, mlflow_template)


@pytest.fixture
def data_project(tmp_path) -> Project:
    """A Project for the data stages alone (fetch_data, prepare), which never open MLflow: it skips
    the migrated MLflow store, whose one-off creation costs seconds."""
    return Project.create(tmp_path)


@pytest.fixture
def image_folder(tmp_path):
    """A small train/test image folder (3 classes) in the pizza_steak_sushi layout."""
    root = tmp_path / "images"
    make_images(root, split="train", per_class=20)
    make_images(root, split="test", per_class=6, seed=1)
    return root


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
    # urllib's default opener keeps the proxies it saw when first used: one built now would send
    # every later request of this test process to the closed port (the settings above are undone)
    urllib.request.install_opener(None)
    yield
    urllib.request.install_opener(None)


# -- trained projects, shared read-only by the evaluate, promotion, predict and MLproject tests ------


@pytest.fixture(scope="session")
def eval_trained(tmp_path_factory, mlflow_template) -> Project:
    """fetch_data, prepare and train run once (EVAL_FAST); not yet evaluated."""
    project = Project.create(tmp_path_factory.mktemp("eval-trained"), mlflow_template, **EVAL_FAST)
    for stage in ("fetch_data", "prepare", "train"):
        project.run(stage)
    return project


@pytest.fixture(scope="session")
def eval_done(eval_trained, tmp_path_factory) -> Project:
    """eval_trained plus evaluate and promote: with no champion yet its model became version 1
    @champion."""
    project = eval_trained.clone(tmp_path_factory.mktemp("eval-done"))
    project.run("evaluate")
    project.run("promote")
    return project


# -- the train tests' data and reference run ------------------------------------------------------


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, mlflow_template) -> Project:
    """Prepared TRAIN_FAST data (not trained): tests copy_prepared() it."""
    return prepared_project(tmp_path_factory.mktemp("train-data"), mlflow_template,
                            lambda folder: make_images(folder, per_class=24, size=16), **TRAIN_FAST)


@pytest.fixture(scope="session")
def train_reference(train_data, tmp_path_factory, mlflow_template) -> Project:
    """One uninterrupted train run on train_data with TRAIN_FAST: what reproduced and resumed runs
    must equal, and whose MLflow run the tracking tests read."""
    project = copy_prepared(train_data, tmp_path_factory.mktemp("train-reference"), mlflow_template)
    project.run("train", env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"})  # a few samples in seconds
    return project


# -- temp git + DVC repos made from this checkout ---------------------------------------------------


@pytest.fixture
def repo(tmp_path, mlflow_template) -> Repo:
    """A temp git + DVC repo (REPO_FAST params, a generated image folder as the source)."""
    return Repo.create(tmp_path / "repo", mlflow_template, **REPO_FAST)


@pytest.fixture(scope="session")
def pristine_repo(tmp_path_factory, mlflow_template) -> Repo:
    """This checkout as a git + DVC repo with FAULT_FAST params, never reproduced."""
    return Repo.create(tmp_path_factory.mktemp("pristine") / "repo", mlflow_template, **FAULT_FAST)


@pytest.fixture(scope="session")
def baseline_repo(pristine_repo, tmp_path_factory) -> Repo:
    """pristine_repo after one uninterrupted `dvc repro` and `promote` (`make repro`), committed: the
    reference result, and model version 1 @champion."""
    repo = pristine_repo.clone(tmp_path_factory.mktemp("baseline") / "repo")
    proc = repo.dvc("repro")
    assert ran_stages(proc.stdout) == {"fetch_data", "prepare", "train", "evaluate"}, proc.stdout
    repo.run("promote")
    repo.commit("baseline repro")
    return repo
