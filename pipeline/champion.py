"""The gate for `@champion`, and moving the alias without races.

Scores are comparable only on the same test data, so every score is kept with the digest of the test
split it was measured on (`test_data_hash`); a champion measured on other data is re-scored on today's
(`rescored.<hash16>.test_<metric>`). Both live as tags on the model versions, in the registry itself.

evaluate only *assesses*: would the new version beat the champion (reports/promotion.json)? Moving
the alias is `promote`, a separate, deliberate step (CI runs it on main). A promotion first marks its
version a candidate (if it beats the best candidate on the same test data by evaluate.promote_min_delta),
then converges: it points the alias at the best candidate and reads back until the alias holds the best
one. Whatever the interleaving of concurrent promotions, the last write is checked against every
candidate marked before it, so the alias ends on the best of them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from pipeline import registry
from pipeline.config import Evaluate
from pipeline.dataset import Split
from pipeline.engine import classify
from pipeline.metrics import compute_metrics
from pipeline.runtime import Runtime

log = logging.getLogger(__name__)

CANDIDATE = "champion.candidate"  # tag: the version was submitted by `promote` and passed the gate
PROMOTED = "promoted"  # tag, "true" once the alias pointed at the version
METRICS = ("accuracy", "f1_macro", "precision_macro", "recall_macro")  # evaluate.promote_metric's choices
CONVERGE_ROUNDS = 20


def decide(new: float, champ: float | None, min_delta: float, metric: str) -> tuple[bool, str]:
    """Promote when there is no champion, or the new score beats it by at least min_delta (a tie
    never promotes: the alias moves only for a real improvement)."""
    if champ is None:
        return True, "no champion yet"
    gain = new - champ
    if gain > 0 and gain >= min_delta:
        return True, f"{metric} {new:.4f} beats champion {champ:.4f} by {gain:.4f} >= {min_delta}"
    return False, f"{metric} {new:.4f} does not beat champion {champ:.4f} by more than 0 and >= {min_delta}"


def score_tags(metrics: dict, test_hash: str, rescored: bool = False) -> dict[str, str]:
    """Version tags holding `metrics` as measured on the test split `test_hash`."""
    if rescored:
        return {f"rescored.{test_hash[:16]}.test_{m}": str(metrics[m]) for m in METRICS}
    return {"test_data_hash": test_hash, **{f"test_{m}": str(metrics[m]) for m in METRICS}}


def score_on(tags: dict, test_hash: str, metric: str) -> float | None:
    """A version's score on the test split `test_hash`, from its tags; None if never measured there."""
    if tags.get("test_data_hash") == test_hash and f"test_{metric}" in tags:
        return float(tags[f"test_{metric}"])
    value = tags.get(f"rescored.{test_hash[:16]}.test_{metric}")
    return None if value is None else float(value)


@dataclass(frozen=True)
class Assessment:
    """evaluate's record (reports/promotion.json): would this version become @champion?"""

    would_promote: bool
    reason: str
    metric: str
    min_delta: float
    new_version: str
    new_score: float
    champion_version: str | None
    champion_score: float | None
    champion_scored: str  # how the champion's score on this test split was obtained
    test_data_hash: str
    run_id: str

    def to_json(self) -> dict:
        return asdict(self)


def ensure_scored(cfg: Evaluate, name: str, test_hash: str, test: Split, classes: list[str],
                  rt: Runtime) -> tuple[object, float | None, str]:
    """(the champion's version or None, its score on the test split `test_hash`, how it was obtained):
    re-scored (and tagged) when it was measured on other data only."""
    champ = registry.champion(name)
    if champ is None:
        return None, None, "none"
    score = score_on(champ.tags or {}, test_hash, cfg.promote_metric)
    if score is not None:
        return champ, score, "recorded on the same test data"
    return (champ, *_rescore(name, champ, test_hash, test, classes, cfg, rt))


def assess(cfg: Evaluate, name: str, version, new_score: float, test_hash: str, test: Split,
           classes: list[str], rt: Runtime) -> Assessment:
    """Compare a registered version with the current champion on the same test split. Moves nothing."""
    champ, champ_score, how = ensure_scored(cfg, name, test_hash, test, classes, rt)
    if champ is not None and str(champ.version) == str(version.version):
        would, reason = True, "this version already is @champion"
    elif champ is not None and champ_score is None:
        would, reason = True, how
    else:
        would, reason = decide(new_score, champ_score, cfg.promote_min_delta, cfg.promote_metric)
    return Assessment(would, reason, cfg.promote_metric, cfg.promote_min_delta, str(version.version), new_score,
                      str(champ.version) if champ else None, champ_score, how, test_hash, version.run_id)


def _rescore(name: str, champ, test_hash: str, test: Split, classes: list[str], cfg: Evaluate,
             rt: Runtime) -> tuple[float | None, str]:
    model = registry.load_model(f"models:/{name}/{champ.version}")
    if model.classes != classes or model.image_size != test.images.shape[-1] \
            or model.channels != test.images.shape[1]:
        return None, "champion takes other classes or input size: not comparable, replaced"
    metrics = compute_metrics(classify(model, test.images, cfg.batch_size, rt), torch.from_numpy(test.labels),
                              classes)
    registry.tag_version(name, champ.version, score_tags(metrics, test_hash, rescored=True))
    return metrics[cfg.promote_metric], "re-scored on today's test data (it was scored on other data)"


@dataclass(frozen=True)
class Outcome:
    """promote's record (reports/champion.json): where the alias ended, and why."""

    version: str  # the version submitted
    promoted: bool  # it is @champion now
    reason: str
    champion_version: str | None
    champion_score: float | None
    score: float
    metric: str
    test_data_hash: str

    def to_json(self) -> dict:
        return asdict(self)


def _candidates(name: str, test_hash: str, metric: str) -> list[tuple[float, int]]:
    """(score, version) of every version that may hold the alias on this test split: those marked
    candidates, and the alias holder, when measured on it."""
    holder = registry.alias_holder(name)
    out = []
    for v in registry.versions(name):
        tags = v.tags or {}
        score = score_on(tags, test_hash, metric)
        if score is not None and (CANDIDATE in tags or str(v.version) == holder):
            out.append((score, int(v.version)))
    return out


def _best(candidates: list[tuple[float, int]]) -> str | None:
    """The highest score; on a tie the earlier version, which was there first."""
    return str(max(candidates, key=lambda c: (c[0], -c[1]))[1]) if candidates else None


def promote(cfg: Evaluate, name: str, version: str, test_hash: str) -> Outcome:
    """Submit `version` for @champion on the test split `test_hash` and move the alias to the best
    candidate. Safe to run again after a crash at any step: the registry holds the whole state."""
    metric = cfg.promote_metric
    tags = registry.version_tags(name, version)
    score = score_on(tags, test_hash, metric)
    if score is None:
        raise ValueError(f"version {version} of {name} has no {metric} on test data {test_hash[:16]}")
    if CANDIDATE not in tags:
        others = [c for c in _candidates(name, test_hash, metric) if c[1] != int(version)]
        best = _best(others)
        best_score = next((s for s, v in others if str(v) == best), None)
        eligible, reason = decide(score, best_score, cfg.promote_min_delta, metric)
        if not eligible:
            holder = registry.alias_holder(name)
            return Outcome(version, holder == version, reason, holder, best_score, score, metric, test_hash)
        registry.tag_version(name, version, {CANDIDATE: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    holder = _converge(name, test_hash, metric)
    cands = dict((str(v), s) for s, v in _candidates(name, test_hash, metric))
    if holder == version:
        registry.tag_version(name, version, {PROMOTED: "true"})
        reason = f"{metric} {score:.4f}: the best of {len(cands)} candidate(s) on this test data"
    else:
        reason = f"version {holder} ({metric} {cands.get(holder, float('nan')):.4f}) is better"
    return Outcome(version, holder == version, reason, holder, cands.get(holder), score, metric, test_hash)


def _converge(name: str, test_hash: str, metric: str) -> str | None:
    """Point the alias at the best candidate until a read after the last write finds it there."""
    for _ in range(CONVERGE_ROUNDS):
        best = _best(_candidates(name, test_hash, metric))
        holder = registry.alias_holder(name)
        if best is None or holder == best:
            return best
        try:
            registry.set_champion(name, best)
        except Exception:
            # MLflow creates an alias with an INSERT after a SELECT: of two first promotions, one
            # finds the row taken. The alias exists then, and the next round compares and updates it.
            if holder is not None or registry.alias_holder(name) is None:
                raise
    raise RuntimeError(f"@champion of {name} did not settle in {CONVERGE_ROUNDS} rounds")
