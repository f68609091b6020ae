"""Corruption: a prepared-cache file changed on disk is detected (sha256) by the stage that reads it and
rebuilt by `dvc repro`; a damaged train checkpoint is set aside, not resumed from."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import pytest
import torch
from helpers.checks import error_line, lines_with
from helpers.project import ran_stages
from helpers.training import read_checkpoint, wait_for_checkpoint

AREA = "Corruption"


def flip_npy_byte(path) -> str:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF  # one pixel of the last image
    path.write_bytes(bytes(data))
    return "one byte flipped in the last image's pixels"


def edit_meta_mean(path) -> str:
    meta = json.loads(path.read_text())
    meta["mean"] = [round(m + 0.01, 6) for m in meta["mean"]]
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return "the normalisation mean edited by +0.01 (valid JSON)"


CORRUPTIONS = {"train.npy": flip_npy_byte, "meta.json": edit_meta_mean}


def test_corrupted_prepared_files_are_detected_and_rebuilt(baseline_repo, tmp_path, fault_log):
    """A file of data/prepared/ changed on disk after prepare wrote it (each case in its own repo, side by side)."""
    cases = {}
    for name, corrupt in CORRUPTIONS.items():
        repo = baseline_repo.clone(tmp_path / name)
        path = repo.path(f"data/prepared/{name}")
        good = path.read_bytes()
        how = corrupt(path)
        cases[name] = (repo, path, good, how, len(repo.runs()), repo.start_stage("train"))
    for name, (repo, path, good, how, runs_before, bg) in cases.items():
        rc = bg.wait(300)
        out = bg.output()
        line = error_line(out)
        assert rc == 1 and "Traceback" not in out, out[-3000:]
        assert f"data/prepared/{name}" in line and "corrupted" in line, line
        assert len(repo.runs()) == runs_before  # failed before starting an MLflow run

        status = repo.dvc("status").stdout
        assert "prepare:" in status and "modified:           data/prepared" in status, status
        again = repo.dvc("repro")
        assert ran_stages(again.stdout) == {"prepare"}, again.stdout  # rebuilt; identical: nothing downstream
        assert path.read_bytes() == good
        clean = repo.dvc("status").stdout
        assert "up to date" in clean, clean
        fault_log.record(AREA, f"data/prepared/{name}: {how}; then `python -m pipeline.train`, `dvc status`, "
                               "`dvc repro`",
                         f"train exit {rc}, no MLflow run started: '{line.split(' pipeline: ', 1)[-1]}'. `dvc status`: "
                         f"prepare 'changed outs: modified: data/prepared'. `dvc repro`: ran only "
                         f"{sorted(ran_stages(again.stdout))}, the file rebuilt byte-identical to the original, train "
                         "and evaluate not re-run; `dvc status` then up to date")


@pytest.fixture(scope="module")
def killed_checkpoint(baseline_repo, tmp_path_factory) -> bytes:
    """The checkpoint a train (baseline_repo's params and data) left when killed -9 after epoch >= 2."""
    repo = baseline_repo.clone(tmp_path_factory.mktemp("killed") / "repo")
    bg = repo.start_stage("train")
    wait_for_checkpoint(repo, bg, epoch=2)
    bg.signal_group(signal.SIGKILL)
    bg.wait()
    ckpt = read_checkpoint(repo.checkpoint())
    assert ckpt is not None and 2 <= ckpt["epoch"] < repo.params()["train"]["epochs"]
    return repo.checkpoint().read_bytes()


def test_truncated_checkpoint_is_set_aside_and_training_starts_afresh(baseline_repo, killed_checkpoint, tmp_path,
                                                                      fault_log):
    """The train checkpoint truncated to half its size, then train."""
    repo = baseline_repo.clone(tmp_path / "repo")
    epochs = repo.params()["train"]["epochs"]
    repo.checkpoint().parent.mkdir(parents=True, exist_ok=True)
    repo.checkpoint().write_bytes(killed_checkpoint[: len(killed_checkpoint) // 2])
    proc = repo.run("train", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = lines_with(proc.stderr, "not resuming from")
    assert warning and "unreadable" in warning[0], proc.stderr[-3000:]
    assert "resuming MLflow run" not in proc.stderr
    assert f"epoch 1/{epochs}" in proc.stderr  # trained from the start
    stale = repo.checkpoint().with_suffix(".stale")
    assert stale.exists() and stale.read_bytes() == killed_checkpoint[: len(killed_checkpoint) // 2]
    mine = torch.load(repo.path("models/model.pt"), map_location="cpu", weights_only=True)["state_dict"]
    ref = torch.load(baseline_repo.path("models/model.pt"), map_location="cpu", weights_only=True)["state_dict"]
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in mine)
    fault_log.record(AREA, "the train checkpoint (left by a kill -9 after epoch >= 2) truncated to half its size; "
                           "then `python -m pipeline.train`",
                     f"exit 0; warned '{warning[0].split(': ', 1)[-1][:160]}'; renamed to {stale.name}; trained epochs "
                     f"1..{epochs} afresh; models/model.pt identical to the uninterrupted run's")


def test_bit_flipped_checkpoint_is_not_resumed_from(killed_checkpoint, tmp_path, fault_log):
    """One byte of the model weights flipped inside a valid checkpoint, then train's load_checkpoint;
    then a second damaged checkpoint, which must not replace the first one set aside."""
    from pipeline.checkpoint import load_checkpoint, read_checkpoint

    good = read_checkpoint(_write(tmp_path / "good.pt", killed_checkpoint))
    name, tensor = next((k, v) for k, v in good["model"].items() if v.is_floating_point() and v.numel() >= 16)
    raw = tensor.numpy().tobytes()
    at = killed_checkpoint.find(raw)
    assert at >= 0  # the tensor's bytes (the first copy: the current weights or the best epoch's)
    data = bytearray(killed_checkpoint)
    data[at + len(raw) // 2] ^= 0x40
    path = _write(tmp_path / "ckpt" / "train.pt", bytes(data))
    # The damage is one torch.load cannot see: without the checksum the weights would be resumed from.
    unchecked = torch.load(io.BytesIO(bytes(data).split(b"\n", 1)[1]), map_location="cpu", weights_only=False)
    assert unchecked["fingerprint"] == good["fingerprint"]
    assert not (torch.equal(unchecked["model"][name], tensor)
                and torch.equal(unchecked["best_state"][name], good["best_state"][name]))

    ckpt = load_checkpoint(path, good["fingerprint"])
    first = tmp_path / "ckpt" / "train.stale"
    assert ckpt is None and not path.exists() and first.read_bytes() == bytes(data)

    _write(path, killed_checkpoint[: len(killed_checkpoint) // 3])
    assert load_checkpoint(path, good["fingerprint"]) is None
    second = tmp_path / "ckpt" / "train.stale1"
    assert first.read_bytes() == bytes(data) and second.read_bytes() == killed_checkpoint[: len(killed_checkpoint) // 3]
    fault_log.record(AREA, f"one byte flipped inside tensor `{name}` of a valid train checkpoint (epoch {good['epoch']}), "
                           "which torch.load still reads, with the right fingerprint; then train's load_checkpoint "
                           "(what the stage calls to resume); then a second, truncated checkpoint",
                     f"refused: sha256 mismatch, not resumed from, set aside as {first.name}; the second set aside as "
                     f"{second.name}, the first kept")


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class _Payload:
    """Unpickling this runs code: it touches a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


TAMPERS = {
    "pickle": ("weights.safetensors replaced by a pickle whose unpickling runs a shell command",
               "not a safetensors weights file"),
    "config": ("model_config.json pointing at an architecture that does not exist", "unknown model"),
    "shapes": ("model_config.json with another class count than the weights", "do not fit"),
}


@pytest.mark.parametrize("how", list(TAMPERS))
def test_a_tampered_model_artifact_is_refused_not_run(eval_done, tmp_path, how, fault_log):
    """The champion's artifacts in the store are rewritten by someone with write access to it; predict,
    a warm start and evaluate's re-scoring read them (registry.load_model)."""
    project = eval_done.clone(tmp_path / "p", own_artifacts=True)  # eval_done's stay as they are
    client = project.client()
    version = client.get_model_version_by_alias("image-classifier", "champion")
    folder = Path(client.get_logged_model(version.source.removeprefix("models:/")).artifact_location
                  .removeprefix("file://")) / "artifacts"
    assert folder.is_relative_to(project.root)
    marker = tmp_path / "pwned"
    if how == "pickle":
        torch.save(_Payload(str(marker)), folder / "weights.safetensors")
    else:
        config = json.loads((folder / "model_config.json").read_text())
        if how == "config":
            config["model"] = "resnet999"
        else:
            config["classes"] = config["classes"] + ["extra"]
        (folder / "model_config.json").write_text(json.dumps(config))
    image = project.path("one.png")
    from PIL import Image

    Image.new("L", (8, 8), 128).save(image)
    proc = project.run("predict", str(image), "--model", "models:/image-classifier@champion", check=False)
    line = error_line(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert TAMPERS[how][1] in line and "models:/image-classifier@champion" in line, line
    assert not marker.exists()  # nothing in the artifact ran
    fault_log.record(AREA, f"the champion's logged model tampered with: {TAMPERS[how][0]}; "
                     "`python -m pipeline.predict --model models:/image-classifier@champion`",
                     f"exit {proc.returncode}: '{line[:240]}'; the pickle's command did not run (no marker file)")
