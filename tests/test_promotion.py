"""Gated promotion to @champion: the decision rule, evaluate's assessment and promote's move for each
case against a real registry, re-scoring a champion scored on other data, failures that must leave
the alias alone, and comparing runs and logged models."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from helpers.predictions import pyfunc_probabilities
from helpers.project import inside_project

from pipeline import champion, compare, evaluate, promote
from pipeline.cli import run_stage
from pipeline.config import PARAMS_FILE, load_params
from pipeline.dataset import DatasetMeta
from pipeline.errors import PipelineError

NAME = "image-classifier"  # params.yaml mlflow.registered_model
FAKE_SOURCE = "file:///nonexistent/fake-champion"  # a champion that evaluate must never need to load


def client_for(project):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=project.tracking_uri, registry_uri=project.tracking_uri)


def read_json(project, rel):
    return json.loads(project.path(rel).read_text())


def champion_version(project) -> int:
    return int(client_for(project).get_model_version_by_alias(NAME, "champion").version)


def fake_champion(project, score: float, test_hash: str) -> int:
    """Register a version scored `score` on the test split `test_hash` and make it @champion."""
    client = client_for(project)
    if not client.search_registered_models(f"name = '{NAME}'"):
        client.create_registered_model(NAME)
    version = client.create_model_version(NAME, FAKE_SOURCE)
    client.set_model_version_tag(NAME, version.version, "test_accuracy", str(score))
    client.set_model_version_tag(NAME, version.version, "test_data_hash", test_hash)
    client.set_registered_model_alias(NAME, "champion", version.version)
    return int(version.version)


def current_test_hash(project) -> str:
    return DatasetMeta.from_json(read_json(project, "data/prepared/meta.json")).split_digest("test")


def evaluate_in_process(project, **overrides) -> dict:
    """The evaluate stage's main, here (no interpreter start-up); returns reports/promotion.json."""
    with inside_project(project):
        evaluate.main(load_params(PARAMS_FILE, overrides))
    return read_json(project, "reports/promotion.json")


def promote_in_process(project, **overrides) -> dict:
    """`python -m pipeline.promote`'s main, here; returns reports/champion.json."""
    with inside_project(project):
        promote.main(load_params(PARAMS_FILE, overrides))
    return read_json(project, "reports/champion.json")


# -- the rule -------------------------------------------------------------------------------------


@pytest.mark.parametrize("new, champ, min_delta, promote", [
    (0.5, None, 0.0, True),     # no champion
    (0.5, None, 0.9, True),     # no champion, whatever the delta
    (0.8, 0.7, 0.0, True),      # better
    (0.7, 0.8, 0.0, False),     # worse
    (0.7, 0.7, 0.0, False),     # a tie never promotes
    (0.75, 0.7, 0.1, False),    # gain 0.05 < min_delta 0.1
    (0.75, 0.5, 0.25, True),    # gain 0.25 == min_delta: enough (exact in binary floating point)
    (0.7, 0.8, -0.5, False),    # a negative delta never lets a worse model through
])
def test_decide(new, champ, min_delta, promote):
    decided, reason = champion.decide(new, champ, min_delta, "accuracy")
    assert decided is promote
    assert reason and ("no champion" in reason) == (champ is None)


# -- each case against a real registry and the real evaluate stage ----------------------------------


@pytest.fixture
def new_score(eval_done) -> float:
    """What eval_trained's model scores on its test split (evaluate is deterministic)."""
    return read_json(eval_done, "reports/metrics.json")["accuracy"]


@pytest.mark.parametrize("case, offset, min_delta, promote", [
    ("better", -0.05, 0.0, True),
    ("worse", +0.05, 0.0, False),
    ("equal", 0.0, 0.0, False),
    ("min_delta larger than the gain", -0.01, 0.05, False),
    ("min_delta smaller than the gain", -0.01, 0.005, True),
])
def test_promotion_against_a_recorded_champion(eval_trained, new_score, tmp_path, case, offset, min_delta, promote):
    project = eval_trained.clone(tmp_path)
    champ_score = new_score + offset
    champ = fake_champion(project, champ_score, current_test_hash(project))

    decision = evaluate_in_process(project, **{"evaluate.promote_min_delta": str(min_delta)})

    assert decision["would_promote"] is promote, decision["reason"]
    assert decision["new_score"] == new_score
    assert decision["champion_version"] == str(champ)
    assert decision["champion_score"] == champ_score  # read back from the tag exactly
    assert decision["champion_scored"] == "recorded on the same test data"
    assert decision["min_delta"] == min_delta
    new_version = decision["new_version"]
    assert new_version != str(champ)
    assert champion_version(project) == champ  # evaluate moves nothing
    if case.startswith("min_delta larger"):
        assert "0.05" in decision["reason"]

    outcome = promote_in_process(project, **{"evaluate.promote_min_delta": str(min_delta)})
    assert outcome["version"] == new_version and outcome["promoted"] is promote, outcome["reason"]
    assert champion_version(project) == (int(new_version) if promote else champ)
    tags = client_for(project).get_model_version(NAME, new_version).tags
    assert (tags.get("promoted") == "true") is promote
    if not promote:
        assert outcome["champion_version"] == str(champ) and "does not beat" in outcome["reason"]


@pytest.fixture(scope="module")
def two_runs(eval_done, tmp_path_factory):
    """eval_done (a 3-epoch model, @champion v1) plus a second, much worse training run (one epoch
    at a tiny learning rate) that was evaluated and submitted to promote too: two real runs, two
    versions."""
    project = eval_done.clone(tmp_path_factory.mktemp("two-runs"))
    project.set(train__epochs=1, train__lr=1e-5)
    project.run("train")
    project.run("evaluate")
    project.run("promote")
    return project


def test_a_worse_second_training_run_does_not_move_the_champion(eval_done, two_runs):
    good = read_json(eval_done, "reports/metrics.json")["accuracy"]
    bad = read_json(two_runs, "reports/metrics.json")["accuracy"]
    assert bad < good - 0.1
    decision = read_json(two_runs, "reports/promotion.json")
    assert decision["would_promote"] is False
    assert (decision["champion_version"], decision["new_version"]) == ("1", "2")
    outcome = read_json(two_runs, "reports/champion.json")
    assert outcome["version"] == "2" and outcome["promoted"] is False and outcome["champion_version"] == "1"
    assert decision["champion_score"] == pytest.approx(good)
    assert decision["champion_scored"] == "recorded on the same test data"
    assert decision["new_score"] == pytest.approx(bad)
    assert champion_version(two_runs) == 1
    client = client_for(two_runs)
    v2 = client.get_model_version(NAME, "2")
    assert v2.run_id == read_json(two_runs, "reports/train.json")["run_id"] != read_json(eval_done, "reports/train.json")["run_id"]
    assert "promoted" not in v2.tags and "champion.candidate" not in v2.tags  # it did not pass the gate
    assert client.get_run(v2.run_id).info.status == "FINISHED"


def test_champion_scored_on_other_data_is_rescored_on_todays_test_split(two_runs, tmp_path):
    import mlflow

    project = two_runs.clone(tmp_path)
    old_hash = current_test_hash(project)
    project.set(prepare__test_fraction=0.3)  # another split of the same images
    project.run("prepare")
    new_hash = current_test_hash(project)
    assert new_hash != old_hash

    decision = evaluate_in_process(project)

    assert decision["test_data_hash"] == new_hash
    assert decision["champion_version"] == "1"
    assert decision["champion_scored"].startswith("re-scored")
    # The champion's score on the new split, computed independently through its pyfunc flavour.
    test = np.load(project.path("data/prepared/test.npy"))
    with open(project.path("data/prepared/test.csv")) as f:
        labels = np.array([int(line.split(",")[1]) for line in f.read().splitlines()[1:]])
    with inside_project(project):
        classes = json.loads(project.path("data/prepared/meta.json").read_text())["classes"]
        probs = pyfunc_probabilities(mlflow.pyfunc.load_model(f"models:/{NAME}/1"), test.astype(np.float32) / 255.0,
                                     classes)
    expected = float((np.asarray(probs).argmax(axis=1) == labels).mean())
    assert decision["champion_score"] == pytest.approx(expected, abs=1e-6)
    v1 = client_for(project).get_model_version(NAME, "1").tags
    recorded = float(v1["test_accuracy"])
    assert decision["champion_score"] != recorded  # not the tag recorded on the old split
    # the re-score is kept on the champion's version, keyed by the new split
    assert float(v1[f"rescored.{new_hash[:16]}.test_accuracy"]) == pytest.approx(expected, abs=1e-6)
    # v2 (the weak model) against the re-scored champion: would not be, and is not, promoted; v2 now
    # carries the new hash.
    assert decision["new_score"] < expected
    assert decision["would_promote"] is False
    assert promote_in_process(project)["promoted"] is False
    assert champion_version(project) == 1
    assert client_for(project).get_model_version(NAME, "2").tags["test_data_hash"] == new_hash


# -- failures never move the alias ------------------------------------------------------------------


def test_evaluation_failing_after_registration_leaves_the_alias(eval_trained, tmp_path):
    project = eval_trained.clone(tmp_path)
    champ = fake_champion(project, 0.0, current_test_hash(project))  # any real model would beat it
    blocker = project.path("reports/promotion.json")  # the last output before the alias moves
    blocker.mkdir(parents=True)
    (blocker / "keep").write_text("a folder where the file should go: the rename onto it fails\n")

    proc = project.run("evaluate", check=False)

    assert proc.returncode != 0
    assert "promotion.json" in proc.stderr
    assert champion_version(project) == champ
    client = client_for(project)
    train = read_json(project, "reports/train.json")
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert sorted(int(v.version) for v in versions) == [champ, champ + 1]  # it did register
    run = client.get_run(train["run_id"])
    assert run.info.status == "FAILED"
    assert "test_accuracy" in run.data.metrics  # it got that far
    # No record claims a promotion that did not happen.
    assert "beats champion" in run.data.tags["promotion.reason"]  # it would promote
    assert "promotion.promoted" not in run.data.tags
    assert "promoted" not in client.get_model_version(NAME, str(champ + 1)).tags
    assert blocker.is_dir() and (blocker / "keep").exists()
    assert project.path("reports/metrics.json").exists()


def test_corrupted_test_split_fails_before_touching_mlflow(eval_done, tmp_path, caplog):
    project = eval_done.clone(tmp_path)
    train = read_json(project, "reports/train.json")
    npy = project.path("data/prepared/test.npy")
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF  # one pixel: the sha256 in meta.json no longer matches
    npy.write_bytes(bytes(data))
    before = read_json(project, "reports/promotion.json")

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with inside_project(project), pytest.raises(SystemExit) as exit_info:
            run_stage(evaluate.main, [])
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert exit_info.value.code == 1
    assert "test.npy" in caplog.text and "corrupted" in caplog.text
    assert champion_version(project) == 1
    client = client_for(project)
    assert [v.version for v in client.search_model_versions(f"name = '{NAME}'")] == [1]
    assert client.get_run(train["run_id"]).info.status == "FINISHED"
    assert read_json(project, "reports/promotion.json") == before


def test_missing_model_is_a_clear_error(eval_trained, tmp_path):
    project = eval_trained.clone(tmp_path)
    project.path("models/model.pt").unlink()
    with inside_project(project), pytest.raises(PipelineError, match="train stage"):
        evaluate.main(load_params(PARAMS_FILE))
    assert not client_for(project).search_registered_models()


# -- compare ----------------------------------------------------------------------------------------


def test_compare_sorts_runs_marks_the_champion_and_shows_only_differing_params(eval_done, two_runs):
    good_run = read_json(eval_done, "reports/train.json")["run_id"]
    bad_run = read_json(two_runs, "reports/train.json")["run_id"]
    proc = two_runs.run("compare")
    table_text, link = proc.stdout.strip().split("\n\n")  # the table, then the runs' URL in the MLflow UI
    assert link.startswith("in `mlflow ui`: http") and "workflowType=machine_learning" in link
    lines = table_text.splitlines()
    header = lines[0].split()
    assert {"champion", "test_accuracy", "train.lr", "train.epochs"} <= set(header)
    assert "train.model" not in header and "train.batch_size" not in header and "base.seed" not in header
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == [good_run[:8], bad_run[:8]]  # best test accuracy first
    assert "*" in rows[0] and "*" not in rows[1]
    assert "0.003" in rows[0] and "1e-05" in rows[1]  # train.lr of each

    with inside_project(two_runs):
        table = compare.runs_table("image-classifier", NAME, "accuracy", all_params=True)
    assert {"train.model", "train.batch_size"} <= set(table.columns)
    assert list(table["champion"]) == ["*", ""]


def test_compare_ranks_logged_models_by_their_test_metric(eval_done, two_runs):
    good, bad = (read_json(p, "reports/train.json")["model_uri"].removeprefix("models:/") for p in (eval_done, two_runs))
    proc = two_runs.run("compare", "--models")
    rows = [line.split() for line in proc.stdout.strip().split("\n\n")[0].splitlines()[1:]]
    assert [r[0] for r in rows] == [good, bad]  # MLflow's own order: best test accuracy on this test set
    assert "*" in rows[0] and "*" not in rows[1]
    with inside_project(two_runs):
        table = compare.models_table("image-classifier", NAME, "accuracy", current_test_hash(two_runs))
    assert list(table["test_accuracy"]) == sorted(table["test_accuracy"], reverse=True)
    assert table["test_accuracy"].iloc[0] == pytest.approx(read_json(eval_done, "reports/metrics.json")["accuracy"])


def test_promote_of_an_unregistered_model_says_what_to_do(eval_trained, tmp_path):
    project = eval_trained.clone(tmp_path)  # trained, never evaluated against this store
    proc = project.run("promote", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "models/model.pt" in proc.stderr and "is not registered" in proc.stderr and "dvc repro -f" in proc.stderr
    assert not project.path("reports/champion.json").exists()
