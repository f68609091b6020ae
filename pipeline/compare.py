"""Print the experiment's runs side by side: `python -m pipeline.compare [--all-params]`.

Sorted by evaluate.promote_metric (best first), showing the params that differ between runs, the
main metrics, and which run's model is @champion.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from pipeline import registry, tracking
from pipeline.config import PARAMS_FILE, load_params
from pipeline.errors import PipelineError

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--all-params", action="store_true", help="show every param, not only those that differ")
    args = parser.parse_args(argv)
    try:
        params = load_params(PARAMS_FILE)
        tracking.configure(params.mlflow.experiment)
        table = runs_table(params.mlflow.experiment, params.mlflow.registered_model,
                           params.evaluate.promote_metric, args.all_params)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if table.empty:
        print(f"no runs in experiment {params.mlflow.experiment!r} at {tracking.tracking_uri()}")
        return 0
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
