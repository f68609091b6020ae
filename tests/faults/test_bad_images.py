"""A source folder holding 14 kinds of bad or odd input, run through fetch_data, prepare and train as
real stage processes: each kind is quarantined with a reason, converted, ignored, or refused with a
clear error, and training finishes on what is left."""

from __future__ import annotations

import csv
import json
import os
import time

import subprocess
import sys

import numpy as np

from helpers.images import huge_grey16_png, make_images
from helpers.checks import error_line, lines_with
from helpers.images import SPECIAL  # the special files' writers and the checks of their decoded pixels

AREA = "Bad images"
S = 16  # test_prepare's SPECIAL images are S x S; prepared at S, their pixels are checked exactly

# kind -> file name in class `circle` (SPECIAL's writer)
QUARANTINE = {"zero-byte file": "empty.png", "truncated JPEG": "truncated.jpg", "text file named .jpg": "notes.jpg",
              "HTML error page named .png": "error.png", "decompression bomb (1e8 px PNG, 12 kB)": "bomb.png"}
CONVERT = {"CMYK JPEG": "cmyk.jpg", "RGBA PNG (transparency onto white)": "rgba.png", "palette PNG": "palette.png",
           "palette PNG with transparency": "palette_transparent.png", "16-bit greyscale PNG": "grey16.png",
           "8-bit greyscale PNG": "grey.png", "EXIF-rotated JPEG (orientation 6)": "exif6.jpg"}


def build_source(src) -> None:
    make_images(src, per_class=8, size=S)
    for name in [*QUARANTINE.values(), *CONVERT.values()]:
        SPECIAL[name][0](src / "circle" / name)
    # hidden folders: a notebook's checkpoints inside a class, a .git at the top, holding junk
    for rel in ("circle/.ipynb_checkpoints/notes-checkpoint.png", ".git/objects/junk.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("not an image")
    # symlink loops: a folder link back up the tree, and a file link to itself
    os.symlink("..", src / "square" / "loop")
    os.symlink("self.png", src / "stripes" / "self.png")
    (src / "empty_class").mkdir()  # an empty class folder


def rows(project, split: str) -> list[tuple[str, int]]:
    with open(project.path(f"data/prepared/{split}.csv"), newline="") as f:
        return [(r["file"], int(r["label"])) for r in csv.DictReader(f)]


def timed(project, stage: str, timeout: float = 120):
    start = time.monotonic()
    proc = project.run(stage, check=False, timeout=timeout)
    return proc, time.monotonic() - start


def test_bad_image_folder_end_to_end(project, fault_log):
    """14 kinds of bad input in one source: fetch_data, prepare, train."""
    src = project.path("data/sources/bad")
    build_source(src)
    project.set(data__source="data/sources/bad", prepare__image_size=S, prepare__channels=3,
                prepare__min_images_per_class=3, train__hidden_units=4, train__epochs=2, train__batch_size=16)

    # 1. with the empty class folder: refused by name, before anything is decoded
    fetch, fetch_s = timed(project, "fetch_data")
    assert fetch.returncode == 0, fetch.stderr
    assert fetch_s < 30  # the symlink loops did not trap the copy
    assert project.path("data/raw/empty_class").is_dir()
    refused, _ = timed(project, "prepare")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "'empty_class' (0)" in refused.stderr and "prepare.min_images_per_class=3" in refused.stderr
    assert not project.path("data/prepared").exists()
    fault_log.record(AREA, "an empty class folder `empty_class/` beside 3 good classes",
                     f"fetch_data kept it (data/raw/empty_class/); prepare exit {refused.returncode}: "
                     f"'{error_line(refused.stderr).split(': ', 1)[-1]}' (no traceback, nothing written)")

    # 2. without it: every other kind is handled and training finishes
    (src / "empty_class").rmdir()
    fetch, fetch_s = timed(project, "fetch_data")
    assert fetch.returncode == 0, fetch.stderr
    skipped = lines_with(fetch.stderr, "skipping")
    assert any("square/loop" in line and "symlink loop" in line for line in skipped), fetch.stderr
    assert any("stripes/self.png" in line for line in skipped), fetch.stderr
    raw = {p.relative_to(project.path("data/raw")).as_posix() for p in project.path("data/raw").rglob("*")}
    assert not any(".git" in r or ".ipynb_checkpoints" in r or "loop" in r or "self.png" in r for r in raw), raw
    fault_log.record(AREA, "symlink loops: `square/loop -> ..` (folder) and `stripes/self.png -> self.png` (file)",
                     f"fetch_data exit 0 in {fetch_s:.1f} s, neither copied; it warned: "
                     + "; ".join(line.split(": ", 1)[-1] for line in skipped))
    fault_log.record(AREA, "hidden folders holding junk: `circle/.ipynb_checkpoints/`, `.git/` at the top",
                     "not copied to data/raw, not a class, not in the prepared splits nor the quarantine")

    prep, _ = timed(project, "prepare")
    assert prep.returncode == 0, prep.stderr
    report = json.loads(project.path("reports/data.json").read_text())
    assert report["classes"] == ["circle", "square", "stripes"]
    quarantined = {q["file"]: q["reason"] for q in report["quarantined"]}
    assert sorted(quarantined) == sorted(f"circle/{n}" for n in QUARANTINE.values())
    for kind, name in QUARANTINE.items():
        for text in SPECIAL[name][1][1]:
            assert text in quarantined[f"circle/{name}"], (name, quarantined[f"circle/{name}"])
        fault_log.record(AREA, f"{kind} `circle/{name}`",
                         f"quarantined, reports/data.json: '{quarantined[f'circle/{name}']}'")
    where = {file: (split, i) for split in ("train", "val", "test") for i, (file, _) in enumerate(rows(project, split))}
    for kind, name in CONVERT.items():
        split, i = where[f"circle/{name}"]
        pixels = np.load(project.path(f"data/prepared/{split}.npy"), mmap_mode="r")[i]
        SPECIAL[name][1][1](np.asarray(pixels))  # the exact expected pixels (test_prepare's checks)
        fault_log.record(AREA, f"{kind} `circle/{name}`",
                         f"converted to RGB, in {split}.csv row {i}, pixels as expected")
    assert not any(".ipynb_checkpoints" in f or ".git" in f for f in where)

    train, _ = timed(project, "train", timeout=300)
    assert train.returncode == 0, train.stderr
    summary = json.loads(project.path("reports/train.json").read_text())
    assert project.path("models/model.pt").exists() and summary["stopped_epoch"] == 2
    fault_log.record(AREA, "train on what prepare kept (all of the above in class circle)",
                     f"prepare: {sum(report['images'].values())} images, {len(quarantined)} quarantined; "
                     f"train exit 0, {summary['stopped_epoch']} epochs, best val_acc {summary['best_val_acc']:.3f}, "
                     "models/model.pt written")


PEAK_RSS_MB = 500  # prepare's peak resident memory on one 88.4 M-pixel 16-bit PNG (2.4 GB before)


def test_huge_16bit_png_decodes_in_bounded_memory(data_project, fault_log):
    """A 16-bit greyscale PNG of 88.4 M pixels (~190 kB, under prepare.max_image_pixels): prepare
    decodes it, scaled, with a peak resident memory a small multiple of the decoded image (177 MB)."""
    src = make_images(data_project.path("data/sources/big"), per_class=4, size=S)
    huge = huge_grey16_png(src / "circle" / "huge16.png", value=32768)
    data_project.set(data__source="data/sources/big", prepare__image_size=S, prepare__min_images_per_class=2)
    data_project.run("fetch_data")
    # tools.memwatch runs the stage in its own process and prints that process's VmHWM at exit
    proc = subprocess.run([sys.executable, "-m", "tools.memwatch", "pipeline.prepare"], cwd=data_project.root,
                          env=data_project.env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    peak_mb = int(next(ln for ln in proc.stdout.splitlines() if ln.startswith("VmHWM:")).split()[1]) / 1024
    report = json.loads(data_project.path("reports/data.json").read_text())
    assert report["quarantined"] == []
    where = {f: (split, i) for split in ("train", "val", "test") for i, (f, _) in enumerate(rows(data_project, split))}
    split, i = where["circle/huge16.png"]
    pixels = np.load(data_project.path(f"data/prepared/{split}.npy"), mmap_mode="r")[i]
    assert (np.asarray(pixels) == 128).all()  # 32768 of 65535 scaled to 0..255, rounded: 128
    print(f"prepare peak RSS (VmHWM): {peak_mb:.0f} MB")
    assert peak_mb < PEAK_RSS_MB, f"prepare peaked at {peak_mb:.0f} MB"
    fault_log.record(AREA, f"a 16-bit greyscale PNG of 9400x9400 px ({huge.stat().st_size // 1000} kB on disk, "
                     "under prepare.max_image_pixels)",
                     f"decoded and scaled (every pixel 32768 -> 128), not quarantined; prepare's peak RSS "
                     f"(VmHWM) {peak_mb:.0f} MB, under {PEAK_RSS_MB} MB")
