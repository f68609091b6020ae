"""Move `@champion` to the workspace's model when it is the best on its test data:

    python -m pipeline.promote [--version N] [--section.key VALUE ...]

The deliberate step after `dvc repro` (`make repro` runs both; CI runs it on main only, after review).
Without --version it promotes the registered version of models/model.pt, found by the model file's
sha256 and the test split's digest, so it works the same whether DVC trained the model here or
restored it from its run cache (a pull request's CI run). Race-free against concurrent promotions
and safe to re-run after a crash (champion.promote). Writes reports/champion.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline import champion, provenance, registry, tracking
from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.dataset import load_meta, load_split
from pipeline.errors import PipelineError
from pipeline.io import sha256_file, write_json
from pipeline.paths import CHAMPION_JSON, MODEL_PATH
from pipeline.runtime import resolve_runtime

log = logging.getLogger(__name__)

BRANCHES_ENV = "PIPELINE_PROMOTE_BRANCHES"  # where a shared registry's champion may be moved from
DEFAULT_BRANCHES = "main,master"


def check_branch() -> None:
    """In a shared registry, only reviewed code moves the champion: a clean checkout of a main branch."""
    if not tracking.shared_store():
        return  # this workspace's own store: the user's to change
    allowed = [b.strip() for b in os.environ.get(BRANCHES_ENV, DEFAULT_BRANCHES).split(",") if b.strip()]
    branch = provenance.branch()
    if branch not in allowed or provenance.code_dirty():
        state = "with uncommitted changes" if provenance.code_dirty() else f"from branch {branch or '(none)'}"
        raise PipelineError(f"refusing to move @champion in the shared registry {tracking.redacted_uri()} {state}: "
                            f"only a clean checkout of {', '.join(allowed)} promotes ({BRANCHES_ENV}); "
                            "CI does it on main after review")


def workspace_version(name: str, test_hash: str) -> str:
    """The registered version of models/model.pt, measured on the workspace's test split."""
    if not MODEL_PATH.exists():
        raise PipelineError(f"{MODEL_PATH} missing; run the pipeline first (dvc repro)")
    digest = sha256_file(MODEL_PATH)
    found = [v for v in registry.versions(name) if (v.tags or {}).get("model_sha256") == digest
             and (v.tags or {}).get("test_data_hash") == test_hash]
    if not found:
        raise PipelineError(f"{MODEL_PATH} (sha256 {digest[:12]}) is not registered as {name} in "
                            f"{tracking.redacted_uri()}: evaluate did not run against this store (a fresh store, "
                            "or DVC restored the stages from its run cache); re-run them here: dvc repro -f train")
    return str(max(int(v.version) for v in found))


def main(params: Params, version: str | None = None) -> None:
    cfg, name = params.evaluate, params.mlflow.registered_model
    tracking.configure(params.mlflow.experiment)
    check_branch()
    meta = load_meta()
    test_hash = meta.split_digest("test")
    if version is None:
        version = workspace_version(name, test_hash)
    else:
        test_hash = registry.version_tags(name, version).get("test_data_hash", "")
    if test_hash == meta.split_digest("test"):
        # a champion measured on other data is compared on this test split, as evaluate does
        test = load_split("test", meta=meta)
        champion.ensure_scored(cfg, name, test_hash, test, list(meta.classes), resolve_runtime(params.base.device, "fp32"))
    outcome = champion.promote(cfg, name, version, test_hash)
    if outcome.promoted:
        tracking.tag_run(registry.version_run(name, version), {"promotion.promoted": "true"})
    write_json(CHAMPION_JSON, outcome.to_json())
    log.info("version %s %s @champion (%s); %s", version, "is" if outcome.promoted else "is not",
             f"{outcome.metric} {outcome.score:.4f}", outcome.reason)


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.promote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", help="a registered version to promote instead of models/model.pt's")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    run_stage(lambda params: main(params, args.version), overrides)


if __name__ == "__main__":
    cli()
