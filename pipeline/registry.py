"""MLflow's model registry and logged models: loading a model by URI, registering a run's model as a
version, and reading and moving the `@champion` alias. Every call is shielded from Ctrl-C/SIGTERM
like the tracking calls (tracking.mlflow_call)."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.tracking import mlflow_call, redacted_uri

CHAMPION = "champion"


@mlflow_call("setup")
def load_model_with_source(uri: str):
    """A logged Classifier from models:/<id>, models:/<name>/<version>, models:/<name>@<alias> or
    runs:/...; and the URI it resolved to (an alias names the version it pointed at).

    Only the weights (safetensors) and the config (JSON) are read from the model's folder, and the
    network is rebuilt by this code: nothing in the folder is unpickled or run, so whoever can write
    the artifact store cannot run code here."""
    import tempfile

    import mlflow
    import yaml
    from mlflow import MlflowClient

    from pipeline import serving

    source = uri
    try:
        name, sep, alias = uri.removeprefix("models:/").partition("@")
        if uri.startswith("models:/") and sep:
            source = f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
            spec = yaml.safe_load((local / "MLmodel").read_text())
            files = spec["flavors"]["python_function"].get("artifacts", {})
            if not {serving.WEIGHTS, serving.CONFIG} <= set(files):
                raise PipelineError("not a model this pipeline logged (no weights and config artifacts)")
            paths = {key: (local / entry["path"]).resolve() for key, entry in files.items()}
            if not all(p.is_relative_to(local.resolve()) for p in paths.values()):
                raise PipelineError("its artifacts point outside the model's folder")
            return serving.load_files(paths[serving.WEIGHTS], paths[serving.CONFIG]), source
    except PipelineError as e:
        raise PipelineError(f"cannot load model {uri} from {redacted_uri()}: {e}") from None
    except Exception as e:  # MlflowException for unknown names/aliases, OSError for missing files
        raise PipelineError(f"cannot load model {uri} from {redacted_uri()}: {e}") from e


def load_model(uri: str):
    """A logged Classifier (see load_model_with_source)."""
    return load_model_with_source(uri)[0]


@mlflow_call("logging")
def register(model_uri: str, name: str, run_id: str, tags: dict[str, str]):
    """Register the run's logged model under `name` with `tags` (once: a re-run of evaluate on the
    same train run reuses its version, and sets the tags again); returns the ModelVersion."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        try:
            client.create_registered_model(name)
        except mlflow.exceptions.MlflowException:  # created by a concurrent evaluate meanwhile
            client.get_registered_model(name)
    model_id = model_uri.removeprefix("models:/")  # an MLflow 3 logged model: models:/m-<id>
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if version.source == model_uri or getattr(version, "model_id", None) == model_id:
            break
    else:
        version = client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id)
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, str(value))
    return client.get_model_version(name, version.version)


@mlflow_call("setup")
def versions(name: str) -> list:
    """Every version of registered model `name`, with its tags ([] when there is no such model)."""
    from mlflow import MlflowClient

    return list(MlflowClient().search_model_versions(f"name = '{name}'", max_results=100000))


@mlflow_call("setup")
def version_tags(name: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_model_version(name, version).tags or {})


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


@mlflow_call("setup")
def version_run(name: str, version: str) -> str:
    """The run that logged version `version`."""
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(name, version).run_id


def alias_holder(name: str) -> str | None:
    """The version `name@champion` points at, or None."""
    version = champion(name)
    return None if version is None else str(version.version)


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
