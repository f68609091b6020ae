"""MLflow's model registry and logged models: loading a model by URI, registering a run's model as a
version, and reading and moving the `@champion` alias. Every call is shielded from Ctrl-C/SIGTERM
like the tracking calls (tracking.mlflow_call)."""

from __future__ import annotations

from pipeline.errors import PipelineError
from pipeline.tracking import mlflow_call, tracking_uri

CHAMPION = "champion"


@mlflow_call("setup")
def load_model_with_source(uri: str):
    """A logged Classifier from models:/<id>, models:/<name>/<version>, models:/<name>@<alias> or
    runs:/...; and the URI it resolved to (an alias names the version it pointed at)."""
    import mlflow
    from mlflow import MlflowClient

    source = uri
    try:
        name, sep, alias = uri.removeprefix("models:/").partition("@")
        if uri.startswith("models:/") and sep:
            source = f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"
        return mlflow.pytorch.load_model(uri, map_location="cpu"), source
    except Exception as e:  # MlflowException for unknown names/aliases, OSError for missing files
        raise PipelineError(f"cannot load model {uri} from {tracking_uri()}: {e}") from e


def load_model(uri: str):
    """A logged Classifier (see load_model_with_source)."""
    return load_model_with_source(uri)[0]


@mlflow_call("logging")
def register(model_uri: str, name: str, run_id: str):
    """Register the run's logged model under `name` (once: a re-run of evaluate on the same train
    run reuses its version); returns the ModelVersion."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    model_id = model_uri.removeprefix("models:/")  # an MLflow 3 logged model: models:/m-<id>
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if version.source == model_uri or getattr(version, "model_id", None) == model_id:
            return version
    return client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id)


@mlflow_call("setup")
def champion(name: str):
    """The ModelVersion behind `name@champion`, or None when there is none yet."""
    import mlflow
    from mlflow import MlflowClient

    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
            return None
        raise


@mlflow_call("logging")
def tag_version(name: str, version: str, tags: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


@mlflow_call("logging")
def set_champion(name: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(name, CHAMPION, version)
