"""`dvc repro prepare` on a temp git copy of the repo: the stages run, their outputs land in the DVC
cache, a second repro has nothing to do, and a change under data/sources/ re-runs fetch_data."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers.archives import files_of
from helpers.images import image_tree
from helpers.project import VENV_BIN, Repo

pytestmark = pytest.mark.skipif(not (VENV_BIN / "dvc").exists(), reason="dvc is not installed in this venv")


@pytest.fixture
def dvc_repo(tmp_path) -> Repo:
    """The checkout with its committed params (builtin:digits) as a git + DVC repo."""
    return Repo.create(tmp_path / "repo", images=False)


def dvc(repo: Repo, *args: str) -> str:
    proc = repo.dvc(*args)
    return proc.stdout + proc.stderr


def test_repro_prepare_caches_outputs_and_a_second_repro_does_nothing(dvc_repo):
    out = dvc(dvc_repo, "repro", "prepare")
    assert "Running stage 'fetch_data'" in out and "Running stage 'prepare'" in out
    assert "Running stage 'train'" not in out
    prepared = dvc_repo.cached_dir("prepare", "data/prepared")
    assert {"train.npy", "val.npy", "test.npy", "train.csv", "classes.json", "meta.json"} <= set(prepared)
    raw = dvc_repo.cached_dir("fetch_data", "data/raw")
    assert len(raw) == 1797  # params.yaml's builtin:digits
    report = json.loads((dvc_repo.root / "reports" / "data.json").read_text())
    assert sum(report["images"].values()) == 1797

    again = dvc(dvc_repo, "repro", "prepare")
    assert "Stage 'fetch_data' didn't change, skipping" in again
    assert "Stage 'prepare' didn't change, skipping" in again
    assert "Running stage" not in again
    assert "Data and pipelines are up to date" in dvc(dvc_repo, "status", "prepare")

    # Each stage depends on its own params only: a train change leaves prepare up to date, a
    # prepare change marks prepare (and not fetch_data) as changed.
    dvc_repo.set(train__epochs=99)
    assert "Data and pipelines are up to date" in dvc(dvc_repo, "status", "prepare")
    dvc_repo.set(prepare__image_size=16)
    status = dvc(dvc_repo, "status", "prepare")
    assert status.startswith("prepare:") and "params.yaml" in status and "fetch_data" not in status


def test_a_change_under_data_sources_reruns_fetch_data(dvc_repo):
    src = image_tree(dvc_repo.root / "data" / "sources" / "imgs", split=False)
    dvc_repo.set(data__source="data/sources/imgs", prepare__image_size=16, prepare__min_images_per_class=2)
    dvc_repo.commit("a local source")
    first = dvc(dvc_repo, "repro", "prepare")
    assert "Running stage 'fetch_data'" in first and "Running stage 'prepare'" in first
    assert files_of(dvc_repo.root / "data" / "raw") == files_of(src)
    assert "Running stage" not in dvc(dvc_repo, "repro", "prepare")

    shutil.copy(src / "circle" / "circle_000.png", src / "circle" / "circle_new.png")
    status = dvc(dvc_repo, "status", "fetch_data")
    assert "fetch_data:" in status and "data/sources" in status
    second = dvc(dvc_repo, "repro", "prepare")
    assert "Running stage 'fetch_data'" in second and "Running stage 'prepare'" in second
    assert (dvc_repo.root / "data" / "raw" / "circle" / "circle_new.png").is_file()
    report = json.loads((dvc_repo.root / "reports" / "data.json").read_text())
    assert sum(c["circle"] for c in report["counts"].values()) == 9
    assert "Data and pipelines are up to date" in dvc(dvc_repo, "status", "prepare")


def test_an_experiment_rewrites_only_the_values_it_sets(tmp_path):
    """`dvc exp run -S` rewrites params.yaml: the committed file is already in the style DVC writes, so
    only the set value's line changes, and going back is `git checkout params.yaml`."""
    from helpers.project import committed, sh

    root = tmp_path / "exp"
    root.mkdir()
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e",
           "DVC_NO_ANALYTICS": "1"}
    (root / "params.yaml").write_text(committed("params.yaml"))
    (root / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo ran > out.txt\n    params: [train.lr, train.augment]\n"
                                   "    outs: [out.txt]\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "i"],
                ["dvc", "exp", "run", "-q", "-S", "train.lr=0.01"]):
        sh(cmd, root, env)
    diff = [line for line in sh(["git", "diff", "-U0", "params.yaml"], root, env).stdout.splitlines()
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert [line.split("#")[0].strip() for line in diff] == ["-  lr: 0.003", "+  lr: 0.01"], diff
