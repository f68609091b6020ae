"""A local-path DVC remote: `dvc push` of the raw data, prepared cache and model; a fresh clone
`dvc pull`s them and reproduces nothing, without downloading the source again."""

from __future__ import annotations

import functools
import http.server
import threading
import zipfile

import pytest

from helpers.images import make_images
from helpers.project import ran_stages, sh


@pytest.fixture
def zip_server(tmp_path):
    """Serves a generated train/test image zip on 127.0.0.1; yields (url, stop)."""
    src = tmp_path / "zipsrc"
    make_images(src, split="train", per_class=10, size=12)
    make_images(src, split="test", per_class=4, size=12, seed=1)
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "images.zip", "w") as zf:
        for f in sorted(src.rglob("*.png")):
            zf.write(f, f.relative_to(src).as_posix())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def stop():
        httpd.shutdown()
        httpd.server_close()

    yield f"http://127.0.0.1:{httpd.server_port}/images.zip", stop
    stop()


def test_push_then_fresh_clone_pulls_and_reproduces_nothing(repo, zip_server, tmp_path):
    root, env = repo.root, repo.env()
    url, stop_server = zip_server
    repo.set(data__source=url)
    sh(["dvc", "repro"], root, env)
    remote = tmp_path / "remote"
    sh(["dvc", "remote", "add", "-d", "store", str(remote)], root, env)
    repo.commit("pipeline run with a remote")
    pushed = sh(["dvc", "push"], root, env)
    assert "pushed" in pushed.stdout.lower()
    assert any(remote.rglob("*")), "nothing reached the remote"

    stop_server()  # from here on, the source cannot be downloaded
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    clone_env = {**env, "PYTHONPATH": str(clone)}
    assert not (clone / "data/raw").exists() and not (clone / "models/model.pt").exists()
    sh(["dvc", "pull"], clone, clone_env)
    for rel in ("data/raw/train", "data/prepared/train.npy", "data/prepared/meta.json", "models/model.pt"):
        assert (clone / rel).exists(), rel
    assert (clone / "data/prepared/train.npy").read_bytes() == (root / "data/prepared/train.npy").read_bytes()
    again = sh(["dvc", "repro"], clone, clone_env)
    assert ran_stages(again.stdout) == set(), again.stdout
    assert not (clone / "data/downloads").exists()  # nothing was downloaded
    assert "up to date" in sh(["dvc", "status"], clone, clone_env).stdout.lower()
