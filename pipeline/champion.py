"""The gate for `@champion`: a registered version becomes champion only when it beats the current
one on the same test data by at least evaluate.promote_min_delta."""

from __future__ import annotations

import torch

from pipeline import registry, tracking
from pipeline.config import Params
from pipeline.dataset import Split
from pipeline.engine import classify
from pipeline.metrics import compute_metrics
from pipeline.runtime import Runtime


def decide(new: float, champ: float | None, min_delta: float, metric: str) -> tuple[bool, str]:
    """Promote when there is no champion, or the new score beats it by at least min_delta (a tie
    never promotes: the alias moves only for a real improvement)."""
    if champ is None:
        return True, "no champion yet"
    gain = new - champ
    if gain > 0 and gain >= min_delta:
        return True, f"{metric} {new:.4f} beats champion {champ:.4f} by {gain:.4f} >= {min_delta}"
    return False, f"{metric} {new:.4f} does not beat champion {champ:.4f} by more than 0 and >= {min_delta}"


def champion_score(name: str, metric: str, test_hash: str, test: Split, classes: list[str],
                   batch_size: int, rt: Runtime) -> tuple[object, float | None, str]:
    """(champion version or None, its score on today's test split, how that score was obtained)."""
    version = registry.champion(name)
    if version is None:
        return None, None, "none"
    tags = version.tags or {}
    if tags.get("test_data_hash") == test_hash and f"test_{metric}" in tags:
        return version, float(tags[f"test_{metric}"]), "recorded on the same test data"
    model = registry.load_model(f"models:/{name}/{version.version}")
    if list(getattr(model, "classes", [])) != classes or model.image_size != test.images.shape[-1] \
            or model.channels != test.images.shape[1]:
        return version, None, "champion takes other classes or input size: not comparable, replaced"
    probs = classify(model, test.images, batch_size, rt)
    score = compute_metrics(probs, torch.from_numpy(test.labels), classes)[metric]
    return version, score, "re-scored on today's test data (it was scored on other data)"


def promote(params: Params, new_score: float, test: Split, classes: list[str], test_hash: str,
            train_info: dict, rt: Runtime) -> dict:
    """Register the run's model and decide whether it becomes @champion (the alias itself moves
    later, after the outputs are written, and only then are the version and the run tagged
    `promoted`). Tags the version and the run with the score and the reason."""
    cfg, name = params.evaluate, params.mlflow.registered_model
    version = registry.register(train_info["model_uri"], name, train_info["run_id"])
    champ, champ_score, how = champion_score(name, cfg.promote_metric, test_hash, test, classes,
                                             cfg.batch_size, rt)
    if champ is not None and champ.version == version.version:
        promoted, reason = False, "this version already is @champion"
    elif champ is not None and champ_score is None:
        promoted, reason = True, how
    else:
        promoted, reason = decide(new_score, champ_score, cfg.promote_min_delta, cfg.promote_metric)
    registry.tag_version(name, version.version, {f"test_{cfg.promote_metric}": new_score,
                                                 "test_data_hash": test_hash, "promotion_reason": reason})
    tracking.set_tags({"promotion.reason": reason,
                       "registered_model_version": version.version})
    return {
        "promoted": promoted, "reason": reason, "metric": cfg.promote_metric,
        "min_delta": cfg.promote_min_delta, "new_version": version.version, "new_score": new_score,
        "champion_version": champ.version if champ else None, "champion_score": champ_score,
        "champion_scored": how, "test_data_hash": test_hash, "run_id": train_info["run_id"],
    }
