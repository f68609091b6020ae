"""`dvc repro prepare` on a temp git copy of the repo: the stages run, their outputs land in the DVC
cache, a second repro has nothing to do, and a change under data/sources/ re-runs fetch_data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, files_of, image_tree

VENV_BIN = Path(sys.executable).parent  # the venv running the tests: its dvc and its python

pytestmark = pytest.mark.skipif(not (VENV_BIN / "dvc").exists(), reason="dvc is not installed in this venv")


class DvcRepo:
    """A git repo holding a copy of this checkout's tracked files, where dvc runs as a user runs it."""

    def __init__(self, root: Path, tmp: Path):
        self.root = root
        self.env = dict(os.environ)
        self.env.update({
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` is the venv's
            "PYTHONPATH": str(root),  # stages import pipeline/ from the copy, not from the checkout
            "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site-cache"),  # not /var/tmp/dvc
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
        })
        tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], check=True,
                                 capture_output=True, text=True).stdout.split("\0")
        for rel in filter(None, tracked):
            if (REPO / rel).is_file():  # tracked but deleted in the working tree: not copied
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, root / rel)
        assert (root / "dvc.yaml").exists() and (root / ".dvc" / "config").exists()
        self.git("init", "-q")
        self.commit("copy of the checkout")

    def git(self, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=self.root, env=self.env, check=True,
                              capture_output=True, text=True).stdout

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)

    def dvc(self, *args: str) -> str:
        proc = subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"dvc {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    def set(self, **values) -> None:
        path = self.root / "params.yaml"
        params = yaml.safe_load(path.read_text())
        for key, value in values.items():
            section, name = key.split("__")
            params[section][name] = value
        path.write_text(yaml.safe_dump(params, sort_keys=False))

    def lock(self) -> dict:
        return yaml.safe_load((self.root / "dvc.lock").read_text())

    def cached_dir(self, stage: str, out: str) -> dict[str, str]:
        """{relpath: md5} of output folder `out` of `stage` per dvc.lock, read from the DVC cache's
        .dir manifest; asserts every file's object is in the cache with the working file's bytes."""
        (entry,) = [o for o in self.lock()["stages"][stage]["outs"] if o["path"] == out]
        md5 = entry["md5"]
        assert md5.endswith(".dir")
        cache = self.root / ".dvc" / "cache" / "files" / "md5"
        manifest = json.loads((cache / md5[:2] / md5[2:]).read_text())
        files = {item["relpath"]: item["md5"] for item in manifest}
        for rel, digest in files.items():
            obj = cache / digest[:2] / digest[2:]
            assert obj.is_file(), f"{out}/{rel} is not in the DVC cache"
            assert obj.read_bytes() == (self.root / out / rel).read_bytes()
        return files


@pytest.fixture
def dvc_repo(tmp_path) -> DvcRepo:
    root = tmp_path / "repo"
    root.mkdir()
    return DvcRepo(root, tmp_path)


def test_repro_prepare_caches_outputs_and_a_second_repro_does_nothing(dvc_repo):
    out = dvc_repo.dvc("repro", "prepare")
    assert "Running stage 'fetch_data'" in out and "Running stage 'prepare'" in out
    assert "Running stage 'train'" not in out
    prepared = dvc_repo.cached_dir("prepare", "data/prepared")
    assert {"train.npy", "val.npy", "test.npy", "train.csv", "classes.json", "meta.json"} <= set(prepared)
    raw = dvc_repo.cached_dir("fetch_data", "data/raw")
    assert len(raw) == 1797  # params.yaml's builtin:digits
    report = json.loads((dvc_repo.root / "reports" / "data.json").read_text())
    assert sum(report["images"].values()) == 1797

    again = dvc_repo.dvc("repro", "prepare")
    assert "Stage 'fetch_data' didn't change, skipping" in again
    assert "Stage 'prepare' didn't change, skipping" in again
    assert "Running stage" not in again
    assert "Data and pipelines are up to date" in dvc_repo.dvc("status", "prepare")

    # Each stage depends on its own params only: a train change leaves prepare up to date, a
    # prepare change marks prepare (and not fetch_data) as changed.
    dvc_repo.set(train__epochs=99)
    assert "Data and pipelines are up to date" in dvc_repo.dvc("status", "prepare")
    dvc_repo.set(prepare__image_size=16)
    status = dvc_repo.dvc("status", "prepare")
    assert status.startswith("prepare:") and "params.yaml" in status and "fetch_data" not in status


def test_a_change_under_data_sources_reruns_fetch_data(dvc_repo):
    src = image_tree(dvc_repo.root / "data" / "sources" / "imgs", split=False)
    dvc_repo.set(data__source="data/sources/imgs", prepare__image_size=16, prepare__min_images_per_class=2)
    dvc_repo.commit("a local source")
    first = dvc_repo.dvc("repro", "prepare")
    assert "Running stage 'fetch_data'" in first and "Running stage 'prepare'" in first
    assert files_of(dvc_repo.root / "data" / "raw") == files_of(src)
    assert "Running stage" not in dvc_repo.dvc("repro", "prepare")

    shutil.copy(src / "circle" / "circle_000.png", src / "circle" / "circle_new.png")
    status = dvc_repo.dvc("status", "fetch_data")
    assert "fetch_data:" in status and "data/sources" in status
    second = dvc_repo.dvc("repro", "prepare")
    assert "Running stage 'fetch_data'" in second and "Running stage 'prepare'" in second
    assert (dvc_repo.root / "data" / "raw" / "circle" / "circle_new.png").is_file()
    report = json.loads((dvc_repo.root / "reports" / "data.json").read_text())
    assert sum(c["circle"] for c in report["counts"].values()) == 9
    assert "Data and pipelines are up to date" in dvc_repo.dvc("status", "prepare")
