"""Interruptions of a real `dvc repro`: kill -9 during train (then `dvc repro` resumes to the same
result as an uninterrupted run), SIGINT and SIGTERM during train, kill -9 during prepare and during
evaluate. Signals go to the whole process group of `dvc repro`, as a terminal's Ctrl-C, a CI cancel
(`kill -TERM -<pgid>`) or a kill of everything does."""

from __future__ import annotations

import json
import random
import signal
import sqlite3

import numpy as np
import torch

from helpers.checks import error_line, lines_with
from helpers.files import leftovers, snapshot
from helpers.images import make_images
from helpers.processes import poll
from helpers.project import ran_stages
from helpers.training import EPOCH_KEYS, EPOCH_METRICS, model_pt, read_checkpoint, wait_for_checkpoint

AREA = "Interruptions"


def model_state(repo) -> dict:
    return model_pt(repo)["state_dict"]


def same_tensors(a: dict, b: dict) -> list[str]:
    """Names of the tensors that differ (or exist on one side only)."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


def test_kill_9_during_train_then_dvc_repro_resumes_to_the_same_result(pristine_repo, baseline_repo, tmp_path,
                                                                       fault_log):
    """kill -9 of `dvc repro` and its train stage at a random epoch, then `dvc repro` again."""
    repo = pristine_repo.clone(tmp_path / "repo")  # baseline_repo's params and data, never run
    epochs = repo.params()["train"]["epochs"]
    target = random.randint(1, epochs - 4)  # epochs take ~15 ms here: leave the kill a few of them
    bg = repo.start_dvc("repro")
    wait_for_checkpoint(repo, bg, epoch=target)
    bg.signal_group(signal.SIGKILL)
    rc = bg.wait()
    left = read_checkpoint(repo.checkpoint())
    k = left["epoch"]
    assert rc == -signal.SIGKILL
    assert target <= k < epochs, f"killed after epoch {k} of {epochs}"
    assert not repo.path("models/model.pt").exists()
    assert repo.lock_stage("train") is None  # DVC recorded nothing for the killed stage
    (run,) = repo.runs()
    assert run.info.run_id == left["run_id"] and run.info.status == "RUNNING"  # kill -9: no handler ran

    again = repo.dvc("repro")
    out = again.stdout + again.stderr
    assert ran_stages(again.stdout) == {"train", "evaluate"}
    assert f"resuming MLflow run {left['run_id']} from epoch {k}" in out
    assert f"epoch {k}/{epochs}" not in out and f"epoch {k + 1}/{epochs}" in out  # 1..k not trained again

    metrics = json.loads(repo.path("reports/metrics.json").read_text())
    reference = json.loads(baseline_repo.path("reports/metrics.json").read_text())
    assert metrics == reference
    differ = same_tensors(model_state(repo), model_state(baseline_repo))
    assert differ == []
    (run,) = repo.runs()
    assert run.info.run_id == left["run_id"] and run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert repo.epoch_steps(run.info.run_id, EPOCH_KEYS[key]) == list(range(1, epochs + 1)), key
    assert not repo.checkpoint().exists()
    fault_log.record(
        AREA, f"`kill -9` of the process group of `dvc repro` (dvc and `python -m pipeline.train`) once the "
              f"checkpoint held epoch >= {target} (random), then `dvc repro` again",
        f"killed: dvc exit {rc}, checkpoint at epoch {k}/{epochs}, no models/model.pt, no train entry in dvc.lock, "
        f"MLflow run RUNNING. Re-run: stages {sorted(ran_stages(again.stdout))}, "
        f"'{lines_with(out, 'resuming MLflow run')[0].split(': ', 1)[-1]}', epochs {k + 1}..{epochs} trained; "
        f"reports/metrics.json identical to an uninterrupted `dvc repro` (accuracy {metrics['accuracy']:.4f}), "
        f"models/model.pt: all {len(model_state(repo))} tensors identical; one MLflow run, FINISHED, each of "
        f"{len(EPOCH_METRICS)} epoch metrics logged once per epoch 1..{epochs}; checkpoint removed")


def test_sigint_and_sigterm_during_train_under_dvc_repro(baseline_repo, tmp_path, fault_log):
    """SIGINT to one `dvc repro`'s process group, SIGTERM to another's, while train runs (side by side)."""
    signals = {signal.SIGINT: "interrupted (SIGINT)", signal.SIGTERM: "terminated (SIGTERM)"}
    started = {}
    for sig in signals:
        repo = baseline_repo.clone(tmp_path / sig.name)
        repo.set(train__epochs=1000, train__patience=1000)  # still training when the signal comes
        started[sig] = (repo, repo.lock(), repo.start_dvc("repro"))
    for sig, (repo, lock_before, bg) in started.items():
        ckpt = wait_for_checkpoint(repo, bg, epoch=1)
        assert bg.find("pipeline.train") is not None, bg.members()
        bg.signal_group(sig)
        started[sig] += (ckpt,)
    for sig, (repo, lock_before, bg, ckpt) in started.items():
        rc = bg.wait(120)  # dvc, and the train stage, which may outlive a dvc killed by SIGTERM
        out = bg.output()
        message = signals[sig]
        assert rc != 0
        assert message in out, out[-3000:]
        run = repo.client().get_run(ckpt["run_id"])
        assert run.info.status == "KILLED"
        assert repo.lock() == lock_before
        assert not repo.path("models/model.pt").exists()
        assert not repo.path("reports/train.json").exists()
        assert leftovers(repo.path("models"), repo.path("reports"), repo.path("data")) == []
        status = repo.dvc("status")  # DVC is not left locked
        assert "train:" in status.stdout
        repo.dvc("checkout", "train")  # the previous outputs, from the DVC cache, as dvc.lock still names them
        assert repo.path("models/model.pt").read_bytes() == baseline_repo.path("models/model.pt").read_bytes()
        dvc_line = error_line(out) if sig == signal.SIGINT else f"dvc killed by the signal (exit {rc})"
        fault_log.record(
            AREA, f"{sig.name} to the process group of `dvc repro` (dvc + `python -m pipeline.train`) after epoch "
                  f"{ckpt['epoch']}'s checkpoint, train.epochs=1000",
            f"dvc exit {rc} ({dvc_line}); the stage printed '{lines_with(out, message)[0].split(': ', 1)[-1]}'; "
            f"MLflow run {run.info.status}; dvc.lock byte-identical; no models/model.pt, reports/train.json or temp "
            f"files (DVC removes a stage's non-persist outputs before running it); `dvc status` runs (no stale lock), "
            f"shows train changed; `dvc checkout train` restores the previous models/model.pt byte-identical")


def test_kill_9_during_prepare_leaves_cache_and_lock_as_they_were(baseline_repo, tmp_path, fault_log):
    """kill -9 of `dvc repro prepare` while prepare decodes 3000 new images."""
    repo = baseline_repo.clone(tmp_path / "repo")
    make_images(repo.path("data/sources/images"), per_class=1000, size=16, seed=7)  # >=1000: decode workers
    repo.dvc("repro", "fetch_data")
    prepared, data_json, lock_before = snapshot(repo.path("data/prepared")), repo.path("reports/data.json").read_bytes(), repo.lock()
    bg = repo.start_dvc("repro", "prepare")

    def mid_decode():  # the temp cache's rows are filled as images are decoded: wait for some, not all
        for npy in repo.path("data").glob(".prepared.tmp-*/all.npy"):
            try:
                rows = np.load(npy, mmap_mode="r")
            except (ValueError, OSError, EOFError):  # EOFError: open_memmap has created the file, not yet its header
                return None
            done = int((rows.reshape(len(rows), -1).max(axis=1) > 0).sum())
            return (done, len(rows)) if 0 < done < len(rows) else None

    done, total = poll(mid_decode, "a half-decoded prepare", bg=bg, interval=0.001)
    bg.signal_group(signal.SIGKILL)
    rc = bg.wait()
    assert rc == -signal.SIGKILL
    assert snapshot(repo.path("data/prepared")) == prepared  # every file, by sha256
    # reports/data.json is not `persist`: DVC itself deletes it before running the stage
    report_after = repo.path("reports/data.json").read_bytes() if repo.path("reports/data.json").exists() else None
    assert report_after in (data_json, None)
    assert repo.lock() == lock_before
    stale = leftovers(repo.path("data"))
    assert len(stale) == 1 and ".prepared.tmp-" in stale[0]  # the killed writer's temp cache, never used

    again = repo.dvc("repro", "prepare")
    assert ran_stages(again.stdout) == {"prepare"}
    report = json.loads(repo.path("reports/data.json").read_text())
    assert sum(report["images"].values()) == 3000  # the 36 images were overwritten, 2964 added
    assert leftovers(repo.path("data")) == []  # the stale temp cache was removed
    assert repo.lock() != lock_before
    fault_log.record(
        AREA, "`kill -9` of the process group of `dvc repro prepare` (dvc, prepare, its 2 decode workers) with "
              f"{done} of {total} new images decoded into the temp cache",
        f"dvc exit {rc}; data/prepared: all {len(prepared)} files byte-identical to before (sha256); dvc.lock "
        f"byte-identical; reports/data.json "
        f"{'byte-identical' if report_after else 'deleted (by DVC, before the stage ran: not a persist output)'}; the half-written temp cache {stale[0].rsplit('/', 1)[-1]} was left beside it, "
        f"unused. Re-run `dvc repro prepare`: prepared {sum(report['images'].values())} images, the stale temp "
        f"folder removed, dvc.lock updated")


def test_kill_9_during_evaluate_does_not_move_the_alias(baseline_repo, tmp_path, fault_log):
    """kill -9 of `dvc repro` during evaluate, after the new model version was registered (the store
    is held locked at that moment); then `dvc repro` and `promote` again, as `make repro` does."""
    repo = baseline_repo.clone(tmp_path / "repo")
    name = repo.params()["mlflow"]["registered_model"]
    champion = repo.champion_version()
    assert champion == "1"
    # Any new model must beat the champion: its score recorded on this test data becomes -1.
    repo.client().set_model_version_tag(name, champion, "test_accuracy", "-1")
    repo.set(train__lr=0.01)  # a new train run, then evaluate
    bg = repo.start_dvc("repro")

    def registered():
        try:
            with sqlite3.connect(f"file:{repo.db}?mode=ro", uri=True, timeout=0.05) as con:
                row = con.execute("SELECT max(version) FROM model_versions WHERE name = ?", (name,)).fetchone()
        except sqlite3.OperationalError:  # locked by a writer this instant
            return None
        return row[0] if row[0] and int(row[0]) > int(champion) else None

    new_version = poll(registered, "a new model version", bg=bg, interval=0.001)
    lock = sqlite3.connect(repo.db, timeout=30, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # evaluate blocks at its next MLflow write: the kill lands mid-stage
    at_kill = lock.execute("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = 'champion'",
                           (name,)).fetchone()[0]
    evaluate_pid = bg.find("pipeline.evaluate")
    bg.signal_group(signal.SIGKILL)
    rc = bg.wait()
    lock.execute("ROLLBACK")
    lock.close()
    assert evaluate_pid is not None  # the kill hit evaluate itself
    assert str(at_kill) == champion
    assert repo.champion_version() == champion  # the alias did not move
    assert repo.lock_stage("evaluate") == baseline_repo.lock_stage("evaluate")  # evaluate's lock entry as before
    assert not repo.path("reports/metrics.json").exists() and not repo.path("reports/promotion.json").exists()
    stale = leftovers(repo.path("reports"))

    again = repo.dvc("repro")
    assert ran_stages(again.stdout) == {"evaluate"}
    promotion = json.loads(repo.path("reports/promotion.json").read_text())
    assert promotion["would_promote"] and str(promotion["new_version"]) == str(new_version)
    assert repo.champion_version() == champion  # evaluate moves nothing
    repo.run("promote")
    assert repo.champion_version() == str(new_version)
    assert leftovers(repo.path("reports")) == []
    fault_log.record(
        AREA, "`kill -9` of the process group of `dvc repro` during evaluate, right after it registered model "
              f"version {new_version} (a version that must be promoted), before it could move @champion",
        f"dvc exit {rc}; @champion still version {champion}; dvc.lock's evaluate entry unchanged; no "
        f"reports/metrics.json or promotion.json (removed by DVC before the stage, not rewritten), temp files left: "
        f"{len(stale)}. Re-run `dvc repro`: evaluate alone ran (version {promotion['new_version']} would become "
        f"champion: '{promotion['reason']}'); `promote`: @champion -> {repo.champion_version()}")
