"""@champion under concurrency and crashes: promotions racing against the sqlite store and a real
`mlflow server` (the alias must end on the best, always), a kill -9 at every step of a promotion (the
record must agree with the registry after the re-run), and stages opening a fresh store together."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from helpers.project import REPO
from helpers.race import open_fresh_stores, run_trials

AREA = "Tracking faults"


def summary(results: list[dict]) -> str:
    wrong = [r for r in results if not r["best"]]
    return f"{len(results)} trials, final champion the best in {len(results) - len(wrong)}"


@pytest.fixture
def sqlite_env(tmp_path, mlflow_template):
    import shutil

    shutil.copy(mlflow_template, tmp_path / "race.db")
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'race.db'}?timeout=60", "PYTHONPATH": str(REPO)}


def test_concurrent_promotions_end_on_the_best_in_sqlite(sqlite_env, fault_log):
    """4 promotions at once against the project's sqlite store, 16 trials; a naive read-then-write
    promotion, as control, under the same harness."""
    results = run_trials(sqlite_env, trials=16, workers=4)
    control = run_trials(sqlite_env, trials=6, workers=4, naive=True, seed=1)
    wrong = [r for r in results if not r["best"]]
    fault_log.record(AREA, "4 concurrent `promote`s of versions with random scores (ties included), sqlite store, "
                     "half the trials with a champion in place",
                     f"{summary(results)}; the naive read-compare-write as control: {summary(control)}")
    assert wrong == []
    assert any(not r["best"] for r in control), "the harness did not make promotions race"


# -- kill -9 at every step of a promotion -------------------------------------------------------------

# promote's writes, in order: the candidate tag, the alias, the version's `promoted` tag, the run's tag.
KILL_AFTER = """
import os, signal, sys
from pipeline import promote, registry, tracking
step, calls = int(sys.argv[1]), [0]
def after_each(module, name):
    real = getattr(module, name)
    def call(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(module, name, call)
for module, name in ((registry, "tag_version"), (registry, "set_champion"), (tracking, "tag_run")):
    after_each(module, name)
promote.cli([])
"""
WINDOWS = {1: "after the candidate tag", 2: "after the alias moved", 3: "after the version's `promoted` tag",
           4: "after the run's tag, before reports/champion.json"}


@pytest.fixture(scope="module")
def evaluated_better(eval_trained, tmp_path_factory):
    """eval_trained with a (fake) champion v1 that its model beats, evaluated: version 2 would promote."""
    from mlflow import MlflowClient

    project = eval_trained.clone(tmp_path_factory.mktemp("evaluated-better"))
    client = MlflowClient(tracking_uri=project.tracking_uri)
    client.create_registered_model("image-classifier")
    v1 = client.create_model_version("image-classifier", "file:///nonexistent/fake-champion").version
    meta = json.loads(project.path("data/prepared/meta.json").read_text())
    from pipeline.dataset import DatasetMeta

    client.set_model_version_tag("image-classifier", v1, "test_data_hash", DatasetMeta.from_json(meta).split_digest("test"))
    client.set_model_version_tag("image-classifier", v1, "test_accuracy", "0.0")
    client.set_registered_model_alias("image-classifier", "champion", v1)
    project.run("evaluate")
    assert json.loads(project.path("reports/promotion.json").read_text())["would_promote"] is True
    return project


def registry_state(project) -> dict:
    client = project.client()
    v2 = client.get_model_version("image-classifier", "2")
    record = project.path("reports/champion.json")
    return {"alias": project.champion_version(), "promoted_tag": v2.tags.get("promoted"),
            "run_tag": client.get_run(v2.run_id).data.tags.get("promotion.promoted"),
            "record": json.loads(record.read_text()) if record.exists() else None}


@pytest.mark.parametrize("step", list(WINDOWS))
def test_kill_9_at_each_step_of_promotion(evaluated_better, tmp_path, step, fault_log):
    """kill -9 of `python -m pipeline.promote` right after one of its writes, then promote again."""
    project = evaluated_better.clone(tmp_path)
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER, str(step)], cwd=project.root, env=project.env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = registry_state(project)
    # Nothing claims more than happened: a `promoted` tag or record only once the alias is there.
    assert killed["alias"] == ("2" if step >= 2 else "1")
    if killed["promoted_tag"] or killed["run_tag"]:
        assert killed["alias"] == "2"
    assert killed["record"] is None

    again = project.run("promote")
    final = registry_state(project)
    assert final["alias"] == "2" and final["promoted_tag"] == "true" and final["run_tag"] == "true", again.stderr
    assert final["record"]["version"] == "2" and final["record"]["promoted"] is True
    assert final["record"]["champion_version"] == "2"
    fault_log.record(AREA, f"kill -9 of `promote` {WINDOWS[step]} (version 2 beats champion 1)",
                     f"after the kill: @champion {killed['alias']}, version tag promoted={killed['promoted_tag']}, "
                     f"run tag={killed['run_tag']}, reports/champion.json {'absent' if not killed['record'] else 'present'}; "
                     f"promote again: @champion {final['alias']}, record promoted={final['record']['promoted']} "
                     f"('{final['record']['reason']}'), tags true")


# -- a fresh store opened by several stages at once ---------------------------------------------------


def test_stages_opening_a_fresh_store_together(tmp_path, fault_log):
    """4 processes open a new sqlite store at the same instant (a queued sweep on a fresh clone), 6 times."""
    trials = 6
    outcomes = open_fresh_stores(tmp_path, trials, workers=4)
    failures = [o for o in outcomes if o != "ok"]
    fault_log.record(AREA, f"4 stages open a new sqlite store at the same instant, {trials} trials",
                     f"{len(outcomes) - len(failures)} of {len(outcomes)} opened it" +
                     (f"; failures: {failures[:3]}" if failures else "; no migration conflict"))
    assert len(outcomes) == 4 * trials and failures == []
