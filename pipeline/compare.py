"""Print the experiment's runs side by side: `python -m pipeline.compare [--all-params | --models]`.

Sorted by evaluate.promote_metric (best first), showing the params that differ between runs, the
main metrics, and which run's model is @champion. `--models`: the experiment's logged models instead,
ranked by MLflow itself (mlflow.search_logged_models) by their metric on the current test split.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from pipeline import registry, tracking
from pipeline.config import PARAMS_FILE, load_params
from pipeline.dataset import load_meta
from pipeline.errors import PipelineError
from pipeline.paths import PREPARED_DIR

SUMMARY_METRICS = ("best_val_acc", "best_epoch", "stopped_epoch")


def runs_table(experiment: str, registered_model: str, metric: str, all_params: bool = False) -> pd.DataFrame:
    """One row per run of `experiment`; empty when there are none."""
    import mlflow

    runs = mlflow.search_runs(experiment_names=[experiment])
    if runs.empty:
        return runs
    champ = registry.champion(registered_model)
    params = [c for c in runs.columns if c.startswith("params.") and c != "params.train.stop_reason"]
    if not all_params:  # only what differs: that is what explains the metric differences
        params = [c for c in params if runs[c].astype(str).nunique(dropna=False) > 1]
    metrics = [f"metrics.test_{metric}", *(f"metrics.{m}" for m in SUMMARY_METRICS)]
    table = runs[["run_id", "status", "start_time"]].copy()
    table["run_id"] = table["run_id"].str[:8]
    table["champion"] = ["*" if champ is not None and r == champ.run_id else "" for r in runs["run_id"]]
    for col in metrics:
        table[col.removeprefix("metrics.")] = runs[col] if col in runs else float("nan")
    for col in params:
        table[col.removeprefix("params.")] = runs[col]
    table["start_time"] = table["start_time"].dt.strftime("%Y-%m-%d %H:%M")
    return table.sort_values(f"test_{metric}", ascending=False, na_position="last").reset_index(drop=True)


def models_table(experiment: str, registered_model: str, metric: str, test_hash: str | None) -> pd.DataFrame:
    """The experiment's logged models with a test metric, best first by `metric`; on the test split
    `test_hash` (its digest, as evaluate logs the test set) when given."""
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    order = {"field_name": f"metrics.test_{metric}", "ascending": False}
    if test_hash:
        datasets = [d for d in _test_datasets(exp.experiment_id) if d[1] == test_hash[:32]]
        if datasets:
            order.update(dataset_name=datasets[0][0], dataset_digest=datasets[0][1])
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], order_by=[order], output_format="list")
    champ = registry.champion(registered_model)
    rows = []
    for m in models:
        scores = {x.key: x.value for x in m.metrics or [] if x.key.startswith("test_")
                  and (not test_hash or x.dataset_digest == test_hash[:32])}
        if f"test_{metric}" not in scores:
            continue
        rows.append({"model_id": m.model_id, "run_id": m.source_run_id[:8],
                     "champion": "*" if champ is not None and champ.source == f"models:/{m.model_id}" else "",
                     f"test_{metric}": scores[f"test_{metric}"], "test_accuracy": scores.get("test_accuracy")})
    return pd.DataFrame(rows)


def _test_datasets(experiment_id: str) -> list[tuple[str, str]]:
    """(name, digest) of the test sets evaluate logged in the experiment."""
    import mlflow

    runs = mlflow.search_runs([experiment_id], output_format="list")
    return [(d.dataset.name, d.dataset.digest) for r in runs for d in r.inputs.dataset_inputs
            if any(t.key == "mlflow.data.context" and t.value == "testing" for t in d.tags)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--all-params", action="store_true", help="show every param, not only those that differ")
    parser.add_argument("--models", action="store_true", help="rank the logged models instead of the runs")
    args = parser.parse_args(argv)
    try:
        params = load_params(PARAMS_FILE)
        tracking.configure(params.mlflow.experiment)
        if args.models:
            test_hash = load_meta().split_digest("test") if (PREPARED_DIR / "meta.json").exists() else None
            table = models_table(params.mlflow.experiment, params.mlflow.registered_model,
                                 params.evaluate.promote_metric, test_hash)
        else:
            table = runs_table(params.mlflow.experiment, params.mlflow.registered_model,
                               params.evaluate.promote_metric, args.all_params)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if table.empty:
        print(f"no runs in experiment {params.mlflow.experiment!r} at {tracking.redacted_uri()}")
        return 0
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(table.to_string(index=False))
    import mlflow

    exp = mlflow.get_experiment_by_name(params.mlflow.experiment)
    print(f"\nin `mlflow ui`: {tracking.runs_url(exp.experiment_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
