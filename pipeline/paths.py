"""Where the stages read and write, relative to the project root: the paths dvc.yaml names."""

from pathlib import Path

SOURCES_DIR = Path("data/sources")  # a fetch_data dep: local sources kept here re-run the stage
RAW_DIR = Path("data/raw")
RAW_JSON = Path("data/raw.json")
PREPARED_DIR = Path("data/prepared")
DATA_REPORT = Path("reports/data.json")
MODEL_PATH = Path("models/model.pt")
TRAIN_JSON = Path("reports/train.json")
HISTORY_CSV = Path("reports/train_history.csv")
METRICS_JSON = Path("reports/metrics.json")
PREDICTIONS_CSV = Path("reports/predictions.csv")
PROMOTION_JSON = Path("reports/promotion.json")  # evaluate: would the model become @champion?
CHAMPION_JSON = Path("reports/champion.json")  # promote: where @champion went (not a DVC output)
