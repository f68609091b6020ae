"""Stage prepare: data/raw -> data/prepared/{train,val,test}.{npy,csv} + classes.json + meta.json and
reports/data.json; bad files quarantined with a reason, odd image modes converted right, a stratified
split reproducible by base.seed, and classes left too small refused."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.archives import files_of
from helpers.files import leftovers, snapshot
from helpers.images import CONVERTED, QUARANTINED, SPECIAL, S, image_tree, make_images
from pipeline.dataset import load_split
from pipeline.errors import PipelineError
from pipeline.fetch_data import fetch
from pipeline.images import BadImage, decode
from pipeline.prepare import prepare

SPLITS = ("train", "val", "test")



@pytest.mark.parametrize("name", list(SPECIAL))
def test_decode_special_file(tmp_path, name):
    writer, (kind, expected) = SPECIAL[name]
    path = tmp_path / name
    writer(path)
    if kind == "quarantine":
        with pytest.raises(BadImage) as err:
            decode(path, S, 3, 89478485)
        for text in expected:
            assert text in str(err.value), str(err.value)
    else:
        arr = decode(path, S, 3, 89478485)
        assert arr.dtype == np.uint8 and arr.shape == (3, S, S)
        expected(arr)


@pytest.mark.parametrize("name,value", [("rgba.png", 255), ("palette_transparent.png", 255), ("grey16.png", None)])
def test_decode_to_one_channel(tmp_path, name, value):
    SPECIAL[name][0](tmp_path / name)
    arr = decode(tmp_path / name, S, 1, 89478485)
    assert arr.shape == (1, S, S)
    if name == "grey16.png":
        assert list(arr[0, :: S // 4, 0]) == [255, 128, 4, 0]
    else:
        assert (arr[0, : S // 2, S // 2:] == value).all()  # the transparent corner is white


def test_decode_grey_alpha_and_rgb_into_grey(tmp_path):
    la = np.zeros((S, S, 2), dtype=np.uint8)
    la[:, : S // 2] = (40, 255)  # opaque dark grey | transparent
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    a = decode(tmp_path / "la.png", S, 3, 10**6)
    assert (a[:, :, : S // 2] == 40).all() and (a[:, :, S // 2:] == 255).all()
    Image.new("RGB", (S, S), (255, 0, 0)).save(tmp_path / "red.png")
    assert (decode(tmp_path / "red.png", S, 1, 10**6) == 76).all()  # ITU-R 601 luma of pure red: 0.299*255


def test_decode_resizes_by_squashing(tmp_path):
    a = np.zeros((10, 40), dtype=np.uint8)
    a[:, 20:] = 200  # right half bright, in a wide image
    Image.fromarray(a).save(tmp_path / "wide.png")
    out = decode(tmp_path / "wide.png", 8, 1, 10**6)
    assert out.shape == (1, 8, 8)
    assert (out[0, :, :3] == 0).all() and (out[0, :, 5:] == 200).all()  # squashed, not cropped


@pytest.mark.parametrize("side,max_pixels,ok", [(30, 1000, True), (40, 1600, True), (40, 1000, False),
                                                (100, 1000, False)])
def test_decode_max_pixels(tmp_path, side, max_pixels, ok):
    """prepare.max_image_pixels is the limit, both between it and 2x it (PIL only warns there) and above."""
    Image.new("L", (side, side), 9).save(tmp_path / "x.png")
    if ok:
        assert (decode(tmp_path / "x.png", 8, 1, max_pixels) == 9).all()
    else:
        # (PIL words it as "limit of <2 x max_pixels>" above twice the limit, where it raises itself)
        with pytest.raises(BadImage, match=f"decompression bomb: Image size \\({side * side} pixels\\) exceeds"):
            decode(tmp_path / "x.png", 8, 1, max_pixels)


# -- the stage ------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "label"]
    return [(r[0], int(r[1])) for r in rows[1:]]


def outputs(project) -> dict:
    """Everything prepare wrote: {split: (images, [(file, label)])}, classes, meta, report."""
    folder = project.path("data/prepared")
    out = {s: (np.load(folder / f"{s}.npy"), read_csv(folder / f"{s}.csv")) for s in SPLITS}
    out["classes"] = json.loads((folder / "classes.json").read_text())
    out["meta"] = json.loads((folder / "meta.json").read_text())
    out["report"] = json.loads(project.path("reports/data.json").read_text())
    return out


def fetch_source(project, build, **params) -> Path:
    """Build a local source under data/sources/src with `build(folder)`, fetch it, set `params`."""
    src = project.path("data/sources/src")
    build(src)
    project.set(**{"data__source": "data/sources/src", "prepare__image_size": S, "prepare__min_images_per_class": 5,
                   **params})
    project.call(fetch)
    return src


@pytest.mark.parametrize("channels", [1, 3])
def test_outputs(data_project, channels):
    fetch_source(data_project, image_tree, prepare__channels=channels)
    report = data_project.call(prepare)
    out = outputs(data_project)
    assert sorted(os.listdir(data_project.path("data/prepared"))) == [
        "classes.json", "meta.json", "test.csv", "test.npy", "train.csv", "train.npy", "val.csv", "val.npy"]
    assert out["classes"] == ["circle", "square", "stripes"] == report["classes"] == out["report"]["classes"]
    raw = data_project.path("data/raw")
    seen = []
    for split in SPLITS:
        images, rows = out[split]
        assert images.dtype == np.uint8 and images.shape == (len(rows), channels, S, S)
        for (file, label), image in zip(rows, images):
            assert file.split("/")[-2] == out["classes"][label]  # the label is the file's class folder
            np.testing.assert_array_equal(image, decode(raw / file, S, channels, 10**6))  # row i is file i
        seen += [f for f, _ in rows]
        counts = {c: sum(1 for _, lab in rows if lab == i) for i, c in enumerate(out["classes"])}
        assert out["report"]["counts"][split] == counts
        assert out["report"]["images"][split] == len(rows)
        # meta.json records every output's digest, and the reader checks them.
        loaded = load_split(split, data_project.path("data/prepared"))
        np.testing.assert_array_equal(loaded.images, images)
        assert loaded.files == [f for f, _ in rows]
    assert sorted(seen) == sorted(files_of(raw))  # every raw image once, in exactly one split
    assert out["report"]["quarantined"] == []
    meta = out["meta"]
    assert meta["image_size"] == S and meta["channels"] == channels and meta["classes"] == out["classes"]
    train = out["train"][0].astype(np.float64) / 255
    np.testing.assert_allclose(meta["mean"], train.mean(axis=(0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(meta["std"], train.std(axis=(0, 2, 3)), atol=1e-5)
    assert meta["raw_sha256"] == json.loads(data_project.path("data/raw.json").read_text())["content_sha256"]


def test_corrupted_cache_is_detected_by_the_reader(data_project):
    fetch_source(data_project, image_tree)
    data_project.call(prepare)
    npy = data_project.path("data/prepared/train.npy")
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF
    npy.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="train.npy: missing or corrupted"):
        load_split("train", data_project.path("data/prepared"))


def test_bad_and_odd_files(data_project):
    """One source holding every special file in class circle: the bad ones are quarantined with their
    reasons in reports/data.json, the odd ones land in the cache with the right pixels."""
    def build(src):
        make_images(src, per_class=6, size=S)
        for name, (writer, _) in SPECIAL.items():
            writer(src / "circle" / name)

    fetch_source(data_project, build, prepare__channels=3)
    data_project.call(prepare)
    out = outputs(data_project)
    quarantined = {q["file"]: q["reason"] for q in out["report"]["quarantined"]}
    assert sorted(quarantined) == [f"circle/{n}" for n in QUARANTINED]
    for name in QUARANTINED:
        for text in SPECIAL[name][1][1]:
            assert text in quarantined[f"circle/{name}"], (name, quarantined[f"circle/{name}"])
    rows = {file: (split, i) for split in SPLITS for i, (file, _) in enumerate(out[split][1])}
    for name in CONVERTED:
        split, i = rows[f"circle/{name}"]
        SPECIAL[name][1][1](out[split][0][i])
    circle = sum(out["report"]["counts"][s]["circle"] for s in SPLITS)
    assert circle == 6 + len(CONVERTED)
    assert not any(f"circle/{n}" in rows for n in QUARANTINED)


def test_max_image_pixels_is_the_stage_limit(data_project):
    def build(src):
        make_images(src, per_class=6, size=S)  # 256 pixels each
        Image.new("L", (40, 40), 9).save(src / "circle" / "big.png")  # 1600 pixels: under PIL's own limit

    fetch_source(data_project, build, prepare__max_image_pixels=1000)
    report = data_project.call(prepare)
    assert [q["file"] for q in report["quarantined"]] == ["circle/big.png"]
    assert report["quarantined"][0]["reason"].startswith("decompression bomb: Image size (1600 pixels)")


def test_hidden_folders_in_raw_are_ignored(data_project):
    fetch_source(data_project, lambda src: make_images(src, per_class=6, size=S))
    raw = data_project.path("data/raw")
    clean = sorted(files_of(raw))
    png = (raw / "circle/circle_000.png").read_bytes()
    for rel in (".ipynb_checkpoints/circle_000-checkpoint.png", "circle/.ipynb_checkpoints/x-checkpoint.png",
                ".git/objects/x.png", "square/.git/y.png", "square/.hidden.png", "stripes/deep/.cache/z.png"):
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(png)
    data_project.call(prepare)
    out = outputs(data_project)
    assert out["classes"] == ["circle", "square", "stripes"]
    assert sorted(f for s in SPLITS for f, _ in out[s][1]) == clean
    assert out["report"]["quarantined"] == []


def test_symlink_loops_in_raw_do_not_hang(data_project):
    fetch_source(data_project, lambda src: make_images(src, per_class=6, size=S))
    raw = data_project.path("data/raw")
    clean = sorted(files_of(raw))
    os.symlink("..", raw / "circle" / "up")
    os.symlink(".", raw / "square" / "here")
    os.symlink("loop.png", raw / "stripes" / "loop.png")
    start = time.monotonic()
    proc = data_project.run("prepare", timeout=60)
    assert time.monotonic() - start < 30
    out = outputs(data_project)
    files = sorted(f for s in SPLITS for f, _ in out[s][1])
    assert files == clean  # nothing reached through the folder links
    assert [q["file"] for q in out["report"]["quarantined"]] == ["stripes/loop.png"]
    assert "quarantined 1 of" in proc.stderr


# -- too few images -------------------------------------------------------------------------------


def small_class_source(src: Path, square: int, corrupt: int = 0) -> None:
    make_images(src, classes=("circle", "square", "stripes"), per_class=8, size=S)
    for i in range(square, 8):
        (src / "square" / f"square_{i:03d}.png").unlink()
    for i in range(corrupt):
        (src / "square" / f"square_{i:03d}.png").write_text("<html>Service Unavailable</html>")


@pytest.mark.parametrize("square,corrupt,texts", [
    (3, 0, ["in data/raw, classes with fewer than prepare.min_images_per_class=5 images: 'square' (3)"]),
    (6, 3, ["after quarantining unusable files, classes with fewer than prepare.min_images_per_class=5 images: "
            "'square' (3)"]),
])
def test_class_with_too_few_images_is_an_error(data_project, square, corrupt, texts):
    # A good prepare first: a failing one must leave its outputs as they were.
    fetch_source(data_project, lambda src: make_images(src, per_class=8, size=S))
    data_project.call(prepare)
    before = snapshot(data_project.path("data/prepared")), data_project.path("reports/data.json").read_bytes()
    small_class_source(data_project.path("data/sources/small"), square, corrupt)
    data_project.set(data__source="data/sources/small")
    data_project.call(fetch)
    with pytest.raises(PipelineError) as err:
        data_project.call(prepare)
    for text in texts:
        assert text in str(err.value)
    assert "circle" not in str(err.value) and "stripes" not in str(err.value)
    after = snapshot(data_project.path("data/prepared")), data_project.path("reports/data.json").read_bytes()
    assert after == before
    assert leftovers(data_project.path("data")) == []


def test_too_few_images_exits_non_zero_naming_the_class(data_project):
    fetch_source(data_project, lambda src: small_class_source(src, square=6, corrupt=3))
    proc = data_project.run("prepare", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "'square' (3)" in proc.stderr and "prepare.min_images_per_class=5" in proc.stderr
    assert not data_project.path("data/prepared").exists()


def test_prepare_before_fetch_is_a_clear_error(data_project):
    with pytest.raises(PipelineError, match="data/raw.json: missing; run the fetch_data stage first"):
        data_project.call(prepare)


# -- the split ------------------------------------------------------------------------------------


def uneven_source(src: Path) -> None:
    for cls, n, seed in (("circle", 20, 0), ("square", 31, 1), ("stripes", 47, 2)):
        make_images(src, classes=(cls,), per_class=n, size=8, seed=seed)


def test_split_is_stratified(data_project):
    fetch_source(data_project, uneven_source, prepare__image_size=8, prepare__val_fraction=0.25,
                 prepare__test_fraction=0.2)
    report = data_project.call(prepare)
    sizes = {"circle": 20, "square": 31, "stripes": 47}
    for cls, n in sizes.items():
        test, val, train = (report["counts"][s][cls] for s in ("test", "val", "train"))
        assert test + val + train == n
        assert abs(test - n * 0.2) <= 0.5, (cls, test)  # each class's share, within rounding
        assert abs(val - (n - test) * 0.25) <= 0.5, (cls, val)
    out = outputs(data_project)
    files = [f for s in SPLITS for f, _ in out[s][1]]
    assert len(files) == len(set(files)) == sum(sizes.values())


def test_split_is_reproducible_by_seed(data_project):
    fetch_source(data_project, uneven_source, prepare__image_size=8)
    data_project.call(prepare)
    first = snapshot(data_project.path("data/prepared")), data_project.path("reports/data.json").read_bytes()
    first_out = outputs(data_project)
    data_project.call(prepare)
    second = snapshot(data_project.path("data/prepared")), data_project.path("reports/data.json").read_bytes()
    assert second == first  # same seed: byte-identical outputs

    data_project.set(base__seed=7)
    data_project.call(prepare)
    other = outputs(data_project)
    for split in SPLITS:
        assert other[split][1] != first_out[split][1], split  # a different draw ...
        assert other["report"]["counts"][split] == first_out["report"]["counts"][split]  # ... same proportions
    assert sorted(f for s in SPLITS for f, _ in other[s][1]) == sorted(f for s in SPLITS for f, _ in first_out[s][1])


def test_source_test_split_is_kept_and_val_comes_from_train(data_project):
    def build(src):
        make_images(src, split="train", per_class=12, size=8)
        make_images(src, split="test", per_class=5, size=8, seed=1)

    fetch_source(data_project, build, prepare__image_size=8, prepare__val_fraction=0.25)
    report = data_project.call(prepare)
    out = outputs(data_project)
    raw = data_project.path("data/raw")
    source_test = sorted(p.relative_to(raw).as_posix() for p in (raw / "test").rglob("*.png"))
    assert sorted(f for f, _ in out["test"][1]) == source_test
    assert all(f.startswith("train/") for s in ("train", "val") for f, _ in out[s][1])
    assert report["counts"]["val"] == {"circle": 3, "square": 3, "stripes": 3}  # 12 * 0.25 of each class
    assert report["counts"]["train"] == {"circle": 9, "square": 9, "stripes": 9}
    assert report["counts"]["test"] == {"circle": 5, "square": 5, "stripes": 5}


def test_digits_end_to_end(data_project):
    """builtin:digits through both stages as subprocesses (1797 images: prepare decodes in a pool);
    at image_size 8 every cached image is sklearn's digit, scaled to 0..255."""
    from sklearn.datasets import load_digits

    data_project.set(data__source="builtin:digits", prepare__image_size=8)
    data_project.run("fetch_data")
    proc = data_project.run("prepare")
    assert "prepared 1797 images" in proc.stderr
    out = outputs(data_project)
    assert out["classes"] == [str(d) for d in range(10)]
    digits = load_digits()
    expected = (digits.images * 255 / 16).round().astype(np.uint8)
    total = 0
    for split in SPLITS:
        images, rows = out[split]
        total += len(rows)
        for (file, label), image in zip(rows, images):
            i = int(Path(file).stem)
            assert label == digits.target[i]
            np.testing.assert_array_equal(image[0], expected[i])
    assert total == 1797
    assert out["report"]["images"]["test"] == sum(round(n * 0.2) for n in np.bincount(digits.target))


def test_progress_is_logged_without_a_terminal(data_project, caplog, monkeypatch):
    """Under CI or into a log file (stderr not a terminal), fetch_data's copy and prepare's decoding
    report progress as log lines, each with a count and a rate."""
    from pipeline import cli

    monkeypatch.setattr(cli, "PROGRESS_LOG_S", 0.0)  # a line per update, instead of every 10 s
    with caplog.at_level("INFO", logger="pipeline"):
        fetch_source(data_project, image_tree)
        data_project.call(prepare)
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline"]
    total = len(list(data_project.path("data/raw").rglob("*.png")))
    copied = [line for line in lines if line.startswith("copy data/sources/src: ")]
    decoded = [line for line in lines if line.startswith("prepare: decode: ")]
    assert copied[-1].startswith(f"copy data/sources/src: {total} files, ") and copied[-1].endswith(" files/s")
    assert decoded[0].startswith(f"prepare: decode: 1/{total} img, ")
    assert decoded[-1].startswith(f"prepare: decode: {total}/{total} img, ") and decoded[-1].endswith(" img/s")
