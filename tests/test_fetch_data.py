"""Stage fetch_data: every data.source kind, the download cache, and failures that leave data/raw alone.

URL sources are served by a real HTTP server on 127.0.0.1 (helpers.http.LoopbackServer); nothing here
reaches beyond the loopback interface. Most cases call the stage's `fetch` in-process (Project.call);
the ones about what a user sees (exit status, the error line, no hang) run `python -m pipeline.fetch_data`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.archives import files_of, write_tar, write_zip
from helpers.checks import assert_failed_cleanly, fetch_fails
from helpers.files import raw_state, snapshot
from helpers.images import image_tree, make_images
from helpers.project import REPO
from pipeline.fetch_data import fetch
from pipeline.prepare import prepare

SHARED_MNIST = REPO.parent / "shared" / "data" / "MNIST"
MNIST_CLASSES = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
                 "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine"]


def raw_files(project) -> dict[str, bytes]:
    return files_of(project.path("data/raw"))


def raw_json(project) -> dict:
    return json.loads(project.path("data/raw.json").read_text())


# -- builtin and local sources --------------------------------------------------------------------


def test_builtin_digits(data_project):
    from sklearn.datasets import load_digits

    data_project.set(data__source="builtin:digits")
    data_project.call(fetch)
    digits = load_digits()
    raw = data_project.path("data/raw")
    assert sorted(p.name for p in raw.iterdir()) == [str(d) for d in range(10)]
    counts = {d: len(list((raw / str(d)).glob("*.png"))) for d in range(10)}
    assert sum(counts.values()) == 1797
    assert counts == {d: int(n) for d, n in enumerate(np.bincount(digits.target))}
    info = raw_json(data_project)
    assert info["layout"] == "classes" and info["images"] == {"all": 1797}
    assert info["counts"]["all"] == {str(d): n for d, n in counts.items()}
    for i in (0, 5, 1796):
        with Image.open(raw / str(digits.target[i]) / f"{i:04d}.png") as img:
            assert img.mode == "L" and img.size == (8, 8)
            np.testing.assert_array_equal(np.asarray(img), (digits.images[i] * 255 / 16).round().astype(np.uint8))


def test_local_folder_with_train_test_split(data_project, caplog):
    src = image_tree(data_project.path("data/sources/imgs"))
    data_project.set(data__source="data/sources/imgs")
    data_project.call(fetch)
    assert raw_files(data_project) == files_of(src)  # byte-identical copies, same layout
    info = raw_json(data_project)
    assert info["kind"] == "local" and info["layout"] == "train_test"
    assert info["counts"] == {"train": {"circle": 8, "square": 8, "stripes": 8},
                              "test": {"circle": 3, "square": 3, "stripes": 3}}
    assert info["images"] == {"train": 24, "test": 9}
    assert "outside data/sources" not in caplog.text


def test_local_folder_outside_data_sources_warns_that_dvc_cannot_see_it(data_project, tmp_path, caplog):
    src = image_tree(tmp_path / "elsewhere", split=False)
    data_project.set(data__source=str(src))
    data_project.call(fetch)
    assert "outside data/sources" in caplog.text
    assert raw_files(data_project) == files_of(src)


def test_one_wrapping_folder_is_unwrapped(data_project):
    src = data_project.path("data/sources/wrapped")
    image_tree(src / "pizza_steak_sushi")  # archives often wrap everything in one top folder
    data_project.set(data__source="data/sources/wrapped")
    data_project.call(fetch)
    assert raw_files(data_project) == files_of(src / "pizza_steak_sushi")
    assert raw_json(data_project)["layout"] == "train_test"


@pytest.mark.parametrize("fmt", ["zip", "tar.gz", "tar"])
@pytest.mark.parametrize("split", [True, False], ids=["train_test", "classes"])
def test_local_archive(data_project, tmp_path, fmt, split):
    src = image_tree(tmp_path / "src", split=split)
    members = files_of(src, prefix="dataset/")
    archive = data_project.path(f"data/sources/dataset.{fmt}")
    if fmt == "zip":
        write_zip(archive, members)
    else:
        write_tar(archive, members, mode="w:gz" if fmt == "tar.gz" else "w")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    data_project.set(data__source=f"data/sources/dataset.{fmt}", data__sha256=digest.upper())  # any case
    data_project.call(fetch)
    assert raw_files(data_project) == files_of(src)
    info = raw_json(data_project)
    assert info["archive_sha256"] == digest
    assert info["layout"] == ("train_test" if split else "classes")


def test_local_archive_with_wrong_sha256(fetched, tmp_path):
    archive = write_zip(fetched.path("data/sources/d.zip"), files_of(image_tree(tmp_path / "s")))
    before = raw_state(fetched)
    wrong = "0" * 64
    fetched.set(data__source="data/sources/d.zip", data__sha256=wrong)
    proc = fetched.run("fetch_data", check=False)
    actual = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert_failed_cleanly(fetched, proc, before, "sha256 mismatch", f"expected {wrong}", f"actual {actual}",
                          "d.zip")


@pytest.mark.parametrize("case", ["missing", "not_an_archive", "one_class", "test_class_not_in_train", "empty"])
def test_unusable_local_source(fetched, case):
    src = fetched.path("data/sources/bad")
    if case == "not_an_archive":
        src = fetched.path("data/sources/bad.zip")
        src.write_text("not an archive")
        texts = ["bad.zip", "not a zip or tar archive"]
    elif case == "one_class":
        make_images(src, split="train", classes=("only",), per_class=3, size=8)
        texts = ["fewer than 2 class folders"]
    elif case == "test_class_not_in_train":
        make_images(src, split="train", classes=("a", "b"), per_class=3, size=8)
        make_images(src, split="test", classes=("a", "c"), per_class=3, size=8)
        texts = ["test/ has classes that train/ lacks: c"]
    elif case == "empty":
        src.mkdir()
        (src / "readme.txt").write_text("no class folders here")
        texts = ["no class folders found"]
    else:
        texts = ["data/sources/bad", "no such file or folder"]
    fetched.set(data__source=str(src.relative_to(fetched.root)))
    fetch_fails(fetched, *texts)


def test_hidden_entries_are_not_data(data_project, tmp_path):
    src = image_tree(data_project.path("data/sources/imgs"), split=False)
    clean = files_of(src)
    litter = {
        ".ipynb_checkpoints/circle_000-checkpoint.png": (src / "circle/circle_000.png").read_bytes(),
        "circle/.ipynb_checkpoints/circle_001-checkpoint.png": (src / "circle/circle_001.png").read_bytes(),
        ".git/objects/ab/cdef": b"blob",
        ".git/HEAD": b"ref: refs/heads/main\n",
        "square/.DS_Store": b"\0\0\0\1Bud1",
        "__MACOSX/circle/._circle_000.png": b"\0\5\26\7",
        "stripes/Thumbs.db": b"thumbs",
    }
    for rel, data in litter.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    # The same litter inside an archive: kept out of the class list and the counts.
    write_zip(data_project.path("data/sources/imgs.zip"), files_of(src))

    for source in ("data/sources/imgs", "data/sources/imgs.zip"):
        data_project.set(data__source=source)
        data_project.call(fetch)
        info = raw_json(data_project)
        assert info["counts"] == {"all": {"circle": 8, "square": 8, "stripes": 8}}, source
        raw = data_project.path("data/raw")
        assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == ["circle", "square", "stripes"]
        visible = {k: v for k, v in raw_files(data_project).items()
                   if not any(part.startswith(".") for part in k.split("/"))}
        assert visible == clean, source
        if source.endswith(".zip"):
            continue
        assert raw_files(data_project) == clean  # a local folder's hidden entries are not even copied


def test_symlink_loops_in_a_local_folder_do_not_hang(data_project):
    src = image_tree(data_project.path("data/sources/loopy"), split=False)
    clean = files_of(src)
    os.symlink("..", src / "circle" / "up")  # a folder link back to the source root
    os.symlink(".", src / "square" / "here")  # a folder link to itself
    os.symlink("b.png", src / "stripes" / "a.png")  # a -> b -> a: stat fails with ELOOP
    os.symlink("a.png", src / "stripes" / "b.png")
    os.symlink("self.png", src / "stripes" / "self.png")
    data_project.set(data__source="data/sources/loopy")
    start = time.monotonic()
    data_project.run("fetch_data", timeout=60)
    assert time.monotonic() - start < 30
    assert raw_files(data_project) == clean
    data_project.set(prepare__min_images_per_class=2, prepare__image_size=8)
    data_project.run("prepare", timeout=60)


# -- URL sources ----------------------------------------------------------------------------------


def test_url_zip_is_downloaded_once_then_cached(data_project, http_server, tmp_path):
    src = image_tree(tmp_path / "src")
    body = write_zip(tmp_path / "pss.zip", files_of(src, prefix="pizza_steak_sushi/")).read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    url = http_server.serve("/files/pss.zip", body)
    data_project.set(data__source=url, data__sha256=digest)
    data_project.call(fetch)
    assert http_server.requests == ["/files/pss.zip"]
    assert raw_files(data_project) == files_of(src)
    info = raw_json(data_project)
    assert info["kind"] == "url" and info["archive_sha256"] == digest and info["layout"] == "train_test"
    cache = data_project.path("data/downloads")
    cached = list(cache.iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == body and cached[0].name.endswith("pss.zip")
    first = raw_files(data_project)

    # Re-runs (with and without data.sha256, and as the real stage) take the archive from the cache:
    # the server sees no second request.
    data_project.set(data__sha256=None)
    data_project.call(fetch)
    data_project.set(data__sha256=digest)
    proc = data_project.run("fetch_data")
    assert "using cached" in proc.stderr
    assert http_server.requests == ["/files/pss.zip"]
    assert raw_files(data_project) == first


def test_url_tar_gz_without_test_split(data_project, http_server, tmp_path):
    src = image_tree(tmp_path / "src", split=False)
    body = write_tar(tmp_path / "d.tar.gz", files_of(src)).read_bytes()
    data_project.set(data__source=http_server.serve("/d.tar.gz", body))
    data_project.call(fetch)
    assert raw_files(data_project) == files_of(src)
    assert raw_json(data_project)["layout"] == "classes"
    assert http_server.requests == ["/d.tar.gz"]


def test_cached_archive_that_no_longer_matches_sha256_is_downloaded_again(data_project, http_server, tmp_path):
    old = write_zip(tmp_path / "old.zip", files_of(image_tree(tmp_path / "old", split=False))).read_bytes()
    new_src = make_images(tmp_path / "new", classes=("cat", "dog"), per_class=4, size=8)
    new = write_zip(tmp_path / "new.zip", files_of(new_src)).read_bytes()
    url = http_server.serve("/d.zip", old)
    data_project.set(data__source=url)
    data_project.call(fetch)
    http_server.serve("/d.zip", new)
    data_project.set(data__sha256=hashlib.sha256(new).hexdigest())
    data_project.call(fetch)
    assert http_server.requests == ["/d.zip", "/d.zip"]
    assert raw_files(data_project) == files_of(new_src)


# (server behaviour, texts the error must contain besides the URL)
URL_FAILURES = {
    "missing": ["HTTP 404"],
    "truncated": ["got ", " bytes"],  # "got N of N+4096 bytes"
    "reset": ["reset"],
    "stall": ["timed out"],
    "silent": ["timed out"],
}


@pytest.mark.parametrize("mode", list(URL_FAILURES))
def test_url_failure_is_clear_and_leaves_raw_and_cache_clean(fetched, http_server, tmp_path, mode):
    body = write_zip(tmp_path / "d.zip", files_of(image_tree(tmp_path / "src"))).read_bytes()
    url = http_server.url("/d.zip") if mode == "missing" else http_server.serve("/d.zip", body, mode)
    fetched.set(data__source=url)  # data.timeout_s is 0.5 (the `fetched` fixture)
    start = time.monotonic()
    fetch_fails(fetched, url, *URL_FAILURES[mode])
    elapsed = time.monotonic() - start
    assert http_server.requests == ["/d.zip"]
    # Nothing partial is left in the download cache (not even a temp file).
    cache = fetched.path("data/downloads")
    assert not cache.exists() or list(cache.iterdir()) == []
    if mode in ("stall", "silent"):
        assert elapsed < 10, f"a 0.5 s read timeout took {elapsed:.1f}s to fail"


def test_url_failure_exits_non_zero_with_one_clear_line(fetched, http_server, tmp_path):
    body = write_zip(tmp_path / "d.zip", files_of(image_tree(tmp_path / "src"))).read_bytes()
    url = http_server.serve("/d.zip", body, "truncated")
    before = raw_state(fetched)
    fetched.set(data__source=url)
    proc = fetched.run("fetch_data", check=False, timeout=60)
    assert_failed_cleanly(fetched, proc, before, f"error: download of {url} failed: got {len(body)} of "
                                                 f"{len(body) + 4096} bytes")
    assert list(fetched.path("data/downloads").iterdir()) == []


def test_url_with_wrong_sha256(fetched, http_server, tmp_path):
    body = write_zip(tmp_path / "d.zip", files_of(image_tree(tmp_path / "src"))).read_bytes()
    url = http_server.serve("/d.zip", body)
    before = raw_state(fetched)
    wrong = hashlib.sha256(b"something else").hexdigest()
    fetched.set(data__source=url, data__sha256=wrong)
    proc = fetched.run("fetch_data", check=False)
    assert_failed_cleanly(fetched, proc, before, url, "sha256 mismatch", f"expected {wrong}",
                          f"actual {hashlib.sha256(body).hexdigest()}")
    assert list(fetched.path("data/downloads").iterdir()) == []  # the bad download is not cached
    # With the right digest it then works (and downloads, since nothing was cached).
    fetched.set(data__sha256=hashlib.sha256(body).hexdigest())
    fetched.call(fetch)
    assert http_server.requests == ["/d.zip", "/d.zip"]
    assert raw_json(fetched)["layout"] == "train_test"


# -- torchvision sources --------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file (the MNIST format): magic 0x0000_08_<ndim>, big-endian dims, bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.tobytes())


def tiny_mnist(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four files torchvision's MNIST looks for under <root>/MNIST/raw/ (uncompressed: with
    them present, MNIST._check_exists() is true and download=True fetches nothing)."""
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", 30), ("t10k", 10)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
        out["train" if prefix == "train" else "test"] = (images, labels)
    return out


def test_torchvision_mnist_from_files_already_present(data_project, tmp_path, offline):
    root = tmp_path / "tv"
    data = tiny_mnist(root)
    data_project.set(data__source="torchvision:MNIST", data__torchvision_root=str(root))
    data_project.call(fetch)
    info = raw_json(data_project)
    assert info["layout"] == "train_test"
    assert info["counts"]["train"] == {c: 3 for c in MNIST_CLASSES}
    assert info["counts"]["test"] == {c: 1 for c in MNIST_CLASSES}
    raw = data_project.path("data/raw")
    for split, (images, labels) in data.items():
        for i in range(len(images)):
            with Image.open(raw / split / MNIST_CLASSES[labels[i]] / f"{i:05d}.png") as img:
                np.testing.assert_array_equal(np.asarray(img), images[i])
    # The class names (with spaces) go through prepare too; test stays MNIST's own test split.
    data_project.set(prepare__min_images_per_class=2, prepare__image_size=28)
    report = data_project.call(prepare)
    assert report["classes"] == MNIST_CLASSES
    assert report["images"]["test"] == 10 and report["images"]["train"] + report["images"]["val"] == 30


def test_torchvision_without_files_offline_is_a_clear_error(fetched, tmp_path, offline):
    fetched.set(data__source="torchvision:MNIST", data__torchvision_root=str(tmp_path / "empty"))
    fetch_fails(fetched, "torchvision:MNIST", str(tmp_path / "empty"), "data.torchvision_root")


@pytest.mark.skipif(not (SHARED_MNIST / "raw").is_dir(), reason=f"{SHARED_MNIST} absent")
def test_torchvision_mnist_from_the_shared_files(data_project, tmp_path, offline):
    """The real MNIST files (the four .gz that torchvision downloads). torchvision extracts them beside
    themselves, so the test links them into a temp root rather than writing into the shared folder."""
    shared_before = snapshot(SHARED_MNIST)
    root = tmp_path / "tv"
    (root / "MNIST" / "raw").mkdir(parents=True)
    for f in (SHARED_MNIST / "raw").iterdir():
        os.symlink(f, root / "MNIST" / "raw" / f.name)
    data_project.set(data__source="torchvision:MNIST", data__torchvision_root=str(root))
    data_project.call(fetch)
    info = raw_json(data_project)
    assert info["images"] == {"train": 60000, "test": 10000}
    assert info["counts"]["train"]["1 - one"] == 6742 and info["counts"]["test"]["0 - zero"] == 980
    with Image.open(data_project.path("data/raw/train/5 - five/00000.png")) as img:  # MNIST's first image is a 5
        assert img.size == (28, 28) and img.mode == "L" and np.asarray(img).max() == 255
    assert snapshot(SHARED_MNIST) == shared_before
