"""Tracking at the edges: the stages talk to MLflow only through this module.

The tracking URI comes from MLFLOW_TRACKING_URI (credentials from MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD, read by MLflow itself), default the local sqlite:///mlflow.db.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.cli import shielded
from pipeline.errors import PipelineError
from pipeline.urls import redact

log = logging.getLogger(__name__)

# MLflow's usage telemetry: off unless the user turns it on (offline machines stall on it).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# System metrics (CPU, memory, GPU) every 2 s, not MLflow's 10: a digits training takes 20 s.
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "2")
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's "model training" kind

# Seconds spent inside MLflow calls in this process, for the benchmark's "MLflow share": "logging"
# (params, metrics, artifacts, the model) and "setup" (import, store start-up, run start and end).
_spent = {"logging": 0.0, "setup": 0.0}


def mlflow_call(kind: str):
    """Decorate a function that calls MLflow: its time counts as `kind` ("logging" or "setup") in
    seconds_spent(), and Ctrl-C/SIGTERM wait until it returns (cli.shielded)."""

    def decorate(fn):
        @shielded
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _spent[kind] += time.perf_counter() - start

        return wrapper

    return decorate


def seconds_spent() -> dict[str, float]:
    return dict(_spent)


def warm_up() -> None:
    """Do, in a background thread while training runs, what log_model otherwise does on the spot:
    build the installed-packages map for its requirement check (about a second), and import
    mlflow.pyfunc, which mlflow.pytorch loads lazily (60 ms of the 130 ms log_model took)."""
    import threading

    from mlflow.utils import requirements_utils

    build = getattr(requirements_utils, "_init_modules_to_packages_map", None)  # private: probe

    def work() -> None:
        import mlflow.pyfunc  # noqa: F401

        if build is not None:
            build()

    threading.Thread(target=work, name="mlflow-warm-up", daemon=True).start()


REACH_TIMEOUT_S = 5  # a tracking server that does not answer within this fails the stage up front
SQLITE_BUSY_TIMEOUT_S = 60  # concurrent experiments wait this long for sqlite's write lock


def project_root() -> Path:
    """The DVC project's root, also inside `dvc exp run --queue` temp workspaces (DVC_ROOT)."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's sqlite:///mlflow.db, with a busy timeout so that two
    experiments logging at once wait for each other instead of failing with 'database is locked'."""
    return (os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{project_root() / 'mlflow.db'}?timeout={SQLITE_BUSY_TIMEOUT_S}")


def redacted_uri() -> str:
    return redact(tracking_uri())


def runs_url(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's runs list of the experiment, opened as a model-training workspace (MLflow 3's UI
    opens its GenAI overview otherwise)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


PROCESS_TAG = "pipeline.process"  # host/pid:start of the stage that holds the run open

_experiment = {"id": None, "name": None}  # set by configure: the experiment the stage's runs go to


@mlflow_call("setup")
def configure(experiment: str) -> str:
    """Point MLflow at the tracking URI and experiment; fail fast, naming the URI, when a server is
    unreachable, before any training starts."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with _store_lock(uri):
            # Created here for every store, not by set_experiment: when two stages start at once
            # against a server without the experiment, set_experiment returns from a lost creation
            # race without making it active, and the stage's run would go to the Default experiment.
            found = mlflow.get_experiment_by_name(experiment)
            if found is None:
                _create_experiment(experiment, local=uri.startswith("sqlite:"))
            elif any(found.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):  # made before the kind
                for key, value in EXPERIMENT_KIND.items():
                    mlflow.MlflowClient().set_experiment_tag(found.experiment_id, key, value)
            mlflow.MlflowClient().search_registered_models(max_results=1)  # the registry's tables too
        _experiment.update(id=mlflow.set_experiment(experiment).experiment_id, name=experiment)
    except Exception as e:  # MLflow raises its own and requests' errors; all mean the same here
        raise PipelineError(f"MLflow tracking at {redact(uri)}: cannot set experiment {experiment!r}: {e}") from e
    return uri


@contextlib.contextmanager
def _store_lock(uri: str):
    """For a sqlite store, an exclusive lock on <db>.lock while this process first opens it. MLflow
    creates a new store's tables, and migrates an older one's, on first use; two stages doing that at
    once (a queued sweep on a fresh clone, or after an MLflow upgrade) would both run the migrations,
    and one fails. With the lock, the first creates or migrates and the others find it done."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock = Path(uri.removeprefix("sqlite:///").split("?", 1)[0] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _create_experiment(name: str, local: bool) -> None:
    """Create experiment `name` unless a concurrent stage just did. A local store keeps artifacts
    under the project's mlruns/, wherever the first run happens to start (a queued experiment's temp
    workspace is deleted afterwards); a server, where it is configured to."""
    import mlflow

    try:
        mlflow.create_experiment(name, artifact_location=(project_root() / "mlruns").as_uri() if local else None,
                                 tags=EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:
        if mlflow.get_experiment_by_name(name) is None:  # not a lost race with a concurrent run
            raise


def _check_server(uri: str) -> None:
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=REACH_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered (auth or routing aside): reachable
    except (urllib.error.URLError, OSError) as e:
        raise PipelineError(f"MLflow tracking server {redact(uri)} is unreachable ({e}); start it or fix "
                            "MLFLOW_TRACKING_URI") from None


@contextlib.contextmanager
def run(run_id: str | None = None, run_name: str | None = None, tags: dict | None = None,
        system_metrics: bool = False):
    """A started (or reopened) run that always ends: FINISHED, KILLED on Ctrl-C/SIGTERM, FAILED on
    any other exception, never left RUNNING (except by kill -9, which a later stage ends KILLED).
    `system_metrics`: CPU, memory and GPU use sampled while it runs (MLflow's System metrics tab)."""
    active = start_run(run_id, run_name, system_metrics)
    try:
        if tags:
            set_tags(tags)
        yield active
    except BaseException as e:
        # A tracking server that died mid-run makes end_run fail too, after MLflow's minutes of
        # retries: one quick try to end the run, a warning if that fails, and one line naming it.
        interrupted = isinstance(e, KeyboardInterrupt)
        lost = _lost_server()
        _end_run_after_failure("KILLED" if interrupted else "FAILED", fast=lost is not None)
        if lost and not interrupted:
            raise PipelineError(
                f"MLflow tracking server {redact(lost)} stopped answering during run {active.info.run_id} "
                f"({_first_line(e)}); the run stays RUNNING there. Start the server again and re-run "
                "the stage (train resumes from its last checkpoint, in the same run)") from e
        raise
    end_run("FINISHED")


def _lost_server() -> str | None:
    """The tracking URI when it is an http(s) server that no longer answers, else None."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        _check_server(uri)
    except PipelineError:
        return uri
    return None


def _end_run_after_failure(status: str, fast: bool) -> None:
    if fast:  # the server is gone: one try, not MLflow's retries (minutes) here and at exit
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        end_run(status)
    except Exception as e:
        log.warning("could not mark the MLflow run %s: %s", status, _first_line(e))


def _first_line(e: BaseException, limit: int = 240) -> str:
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return text if len(text) <= limit else text[:limit] + "..."


@mlflow_call("setup")
def start_run(run_id: str | None, run_name: str | None = None, system_metrics: bool = False):
    """Start a new run, or reopen `run_id` (a resumed train, or evaluate completing train's run)."""
    import mlflow

    if run_id is None:
        _leave_foreign_env_run()
    return mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, log_system_metrics=system_metrics)


def _leave_foreign_env_run() -> None:
    """`mlflow run` starts a run and hands it to the command in MLFLOW_RUN_ID, and a new run of the
    stage logs into it. MLflow allows that only within the active experiment. Without
    `mlflow run --experiment-name <ours>`, that run is in MLflow's Default experiment and MLflow
    refused to start ("active experiment ID does not match environment run ID"). So the stage starts
    its own run in its experiment and says so."""
    import mlflow

    env_run = os.environ.get("MLFLOW_RUN_ID")
    if not env_run or _experiment["id"] is None:
        return
    if mlflow.get_run(env_run).info.experiment_id != _experiment["id"]:
        log.warning("MLFLOW_RUN_ID %s (set by `mlflow run`) is in another experiment: this stage logs to a new "
                    "run in %r (`mlflow run --experiment-name %s` would log into that run)",
                    env_run, _experiment["name"], _experiment["name"])
        del os.environ["MLFLOW_RUN_ID"]


@mlflow_call("setup")
def end_run(status: str = "FINISHED") -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.end_run(status=status)


@mlflow_call("setup")
def end_abandoned_run(run_id: str, why: str) -> None:
    """Mark KILLED a run that a killed train left RUNNING and that will not be resumed (its
    checkpoint was set aside), with a tag saying why; otherwise it would show as running for ever."""
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "abandoned", why)
            client.set_terminated(run_id, "KILLED")
    except Exception as e:  # a run deleted meanwhile, or another store: not worth failing train for
        log.warning("could not mark the abandoned MLflow run %s KILLED: %s", run_id, _first_line(e))


def _process() -> str:
    """This process as `host/pid:start`, its start time (clock ticks after boot) telling it apart from
    a later process that got the same pid."""
    import socket

    return f"{socket.gethostname()}/{os.getpid()}:{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _gone(process: str) -> bool:
    """Whether the process a run was tagged with has ended. Only a process of this host can be known
    to have ended (by /proc); any other counts as alive."""
    import socket

    host, _, rest = process.partition("/")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit() or not start or not Path("/proc/self/stat").exists():
        return False
    return _start_ticks(int(pid)) != start


def claim_run() -> None:
    """Tag the active run with this process: a run still RUNNING after its process ended was killed
    (end_orphaned_runs)."""
    set_tags({PROCESS_TAG: _process(), "pipeline.workspace": str(project_root())})


@mlflow_call("setup")
def end_orphaned_runs(keep: set[str]) -> list[str]:
    """Mark KILLED, with an `abandoned` tag, the runs of this experiment left RUNNING by a stage that
    was killed (kill -9, the OOM killer) before it could end them, except `keep` (a checkpoint's run,
    which train resumes). Returns their ids."""
    from mlflow import MlflowClient

    client, ended = MlflowClient(), []
    for run in client.search_runs([_experiment["id"]], filter_string="attributes.status = 'RUNNING'"):
        process = run.data.tags.get(PROCESS_TAG, "")
        if run.info.run_id in keep or not process or not _gone(process):
            continue
        client.set_tag(run.info.run_id, "abandoned", f"its process {process} ended without ending the run (killed)")
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning("MLflow run %s was left RUNNING by a killed process (%s): marked KILLED", run.info.run_id, process)
        ended.append(run.info.run_id)
    return ended


@mlflow_call("setup")
def run_status(run_id: str) -> str | None:
    """The run's status (RUNNING, FINISHED, ...), or None when this store has no such (undeleted) run."""
    import mlflow
    from mlflow import MlflowClient

    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
            return None
        raise
    return None if run.info.lifecycle_stage == "deleted" else run.info.status


def require_run(run_id: str, named_in: Path) -> None:
    """Fail with what to do when `named_in` names a run this store does not have."""
    if run_status(run_id) is None:
        raise PipelineError(
            f"{named_in} names MLflow run {run_id}, which is not in {redacted_uri()} (deleted, or trained "
            "against another tracking store): re-run train against this store (dvc repro -f train), or set "
            "MLFLOW_TRACKING_URI to the store it was trained in")


def shared_store() -> bool:
    """A tracking server or database that others use too, not this workspace's own sqlite file."""
    return not tracking_uri().startswith(("sqlite:", "file:", "/"))


@mlflow_call("setup")
def logged_steps(run_id: str, key: str) -> set[int]:
    from mlflow import MlflowClient

    return {m.step for m in MlflowClient().get_metric_history(run_id, key)}


@mlflow_call("logging")
def log_params(params: dict) -> None:
    import mlflow

    mlflow.log_params({k: "null" if v is None else v for k, v in params.items()})


@mlflow_call("logging")
def log_metrics(metrics: dict[str, float], step: int | None = None, model_id: str | None = None,
                dataset=None) -> None:
    """Metrics of the active run; with `model_id` and `dataset` (log_dataset's), also of that logged
    model on that data set, so that mlflow.search_logged_models ranks models by them."""
    import mlflow

    mlflow.log_metrics(metrics, step=step, model_id=model_id, dataset=dataset)


# MLflow's SQL store looks a data set up and inserts it when absent, so runs that start at once in
# one experiment (a `dvc exp` queue with jobs > 1, teammates on one server) can all insert it, and
# all but one fail on the table's key. The loser's transaction rolls back whole and the winner's row
# is committed by then, so a second try finds it and only links the run to it.
_DATASET_CLASH = re.compile(r"(unique|duplicate).*dataset|dataset.*(unique|duplicate)", re.IGNORECASE | re.DOTALL)
_DATASET_TRIES = 3


@mlflow_call("logging")
def log_dataset(path: Path, name: str, digest: str, context: str):
    """Record data as the run's input: its folder, a name and a digest. Returns the MLflow dataset."""
    import mlflow
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.meta_dataset import MetaDataset

    # Named directly: MLflow registers the local source twice and warns when asked to guess.
    local = next(s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource")
    ds = MetaDataset(local(str(Path(path).resolve())), name=name, digest=digest[:32])
    for attempt in range(1, _DATASET_TRIES + 1):
        try:
            mlflow.log_input(ds, context=context)
            break
        except mlflow.exceptions.MlflowException as e:
            if attempt == _DATASET_TRIES or not _DATASET_CLASH.search(str(e)):
                raise
            log.info("another run recorded data set %s at the same moment; recording it again", name)
    return ds


@mlflow_call("logging")
def set_tags(tags: dict) -> None:
    import mlflow

    mlflow.set_tags(tags)


@mlflow_call("logging")
def tag_run(run_id: str, tags: dict) -> None:
    """Tags on a run other than the active one."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


@mlflow_call("logging")
def log_text(text: str, name: str) -> None:
    import mlflow

    mlflow.log_text(text, name)


@mlflow_call("logging")
def log_artifact(path: str | Path, folder: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=folder)


@mlflow_call("logging")
def log_model(model, example_image, step: int, name: str = "model"):
    """Log the served model (a models.Classifier) as pipeline/serving.py's model from code, with its
    weights, config and ONNX export as artifacts, its signature, and `example_image` (uint8
    (C, H, W)) as the input example; returns the logged model's URI (models:/<model_id>)."""
    import json
    import tempfile

    import mlflow

    from pipeline import serving
    from pipeline.models import save_weights

    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        files = {key: Path(tmp) / file for key, file in serving.FILES.items()}
        save_weights(model.net, files[serving.WEIGHTS])
        files[serving.CONFIG].write_text(json.dumps(model.config.to_dict(), indent=2))
        try:
            serving.export_onnx(model, files[serving.ONNX])
        except Exception as e:  # an operator the exporter lacks: the model is served all the same
            log.warning("ONNX export of %s failed, logged without model.onnx: %s", model.config.model,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            del files[serving.ONNX]
        info = mlflow.pyfunc.log_model(
            name=name, python_model=serving.__file__, artifacts={k: str(v) for k, v in files.items()},
            code_paths=[str(Path(__file__).parent)], signature=serving.signature(),
            input_example=serving.input_example(example_image), step=step, pip_requirements=_requirements())
    return info.model_uri


def _requirements() -> list[str]:
    """Exact pins of what loading the model needs, from requirements.txt (skips MLflow's slow
    requirement inference, which loads the model in a subprocess)."""
    wanted = ("torch", "torchvision", "timm", "numpy", "pandas", "pillow", "pyyaml", "mlflow", "safetensors")
    lines = Path(__file__).parent.parent.joinpath("requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.split("==")[0].strip().lower() in wanted]


