"""Where the stages read and write, relative to the project root: the paths dvc.yaml names."""

from pathlib import Path

SOURCES_DIR = Path("data/sources")  # a fetch_data dep: local sources kept here re-run the stage
RAW_DIR = Path("data/raw")
RAW_JSON = Path("data/raw.json")
PREPARED_DIR = Path("data/prepared")
FEATURE_CACHE_DIR = Path("data/features")  # train's frozen-feature cache (pipeline/features.py); not a DVC output
DATA_REPORT = Path("reports/data.json")
MODEL_PATH = Path("models/model.pt")
TRAIN_JSON = Path("reports/train.json")  # the run: its id, logged model, stop reason, timings
TRAIN_METRICS = Path("reports/train_metrics.json")  # the headline numbers `dvc metrics show` shows
HISTORY_CSV = Path("reports/train_history.csv")
FIGURES = Path("reports/figures")  # PNGs: `dvc plots show` needs no internet for them
LOSS_PNG = FIGURES / "loss_curves.png"
CONFUSION_PNG = FIGURES / "confusion_matrix.png"
PREDICTIONS_PNG = FIGURES / "most_confident_predictions.png"
METRICS_JSON = Path("reports/metrics.json")
PER_CLASS_JSON = Path("reports/per_class.json")
PREDICTIONS_CSV = Path("reports/predictions.csv")
PROMOTION_JSON = Path("reports/promotion.json")  # evaluate: would the model become @champion?
CHAMPION_JSON = Path("reports/champion.json")  # promote: where @champion went (not a DVC output)
