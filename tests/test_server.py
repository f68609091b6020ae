"""The pipeline against a real `mlflow server` with basic auth (started by `make server`'s module) on a
free loopback port: runs, artifacts, model versions and the alias land there; anonymous requests are
refused; a server that is down fails a stage fast, before training; runs that start at once record
their shared data set."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers.mlflow_server import PASSWORD, USER, Server, free_port
from helpers.project import REPO, inside_project
from helpers.race import run_trials
from helpers.tls import self_signed
from helpers.training import EPOCH_KEYS

FAST = dict(prepare__image_size=8, prepare__min_images_per_class=3, train__epochs=2, train__hidden_units=4)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m pipeline.server` (what `make server` runs); yields its URL and stops it afterwards."""
    server = Server(tmp_path_factory.mktemp("mlflow-server"))
    server.start(as_make_server=True)
    yield server.url
    server.stop()


@pytest.fixture
def credentials(monkeypatch) -> dict[str, str]:
    """The server's admin account, set in this process's environment (where MLflow's client reads it)
    and returned for the environment of processes the test starts."""
    account = {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    for key, value in account.items():
        monkeypatch.setenv(key, value)
    return account


def _get(url: str, auth: bool, context: ssl.SSLContext | None = None, password: str = PASSWORD) -> int:
    req = urllib.request.Request(url + "/api/2.0/mlflow/experiments/search?max_results=10")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_server_refuses_anonymous_requests(server):
    assert _get(server, auth=False) == 401
    assert _get(server, auth=True) == 200
    # the user's credentials are now in the server's auth cache: a wrong password must still be refused
    assert _get(server, auth=True, password=PASSWORD + "x") == 401


def test_server_command_needs_credentials():
    from pipeline.server import server_command

    with pytest.raises(SystemExit, match="MLFLOW_TRACKING_PASSWORD"):
        server_command({"MLFLOW_TRACKING_USERNAME": "admin"})
    secret = "pw-Zq81x"
    argv, env, ini = server_command({"MLFLOW_TRACKING_USERNAME": "a", "MLFLOW_TRACKING_PASSWORD": secret})
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # loopback unless told otherwise
    assert "--allowed-hosts" in argv and "--artifacts-destination" in argv
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == secret and secret not in ini and secret not in " ".join(argv)


def machine_ip() -> str:
    """A non-loopback IPv4 address of this machine, as a teammate would reach it."""
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    pytest.skip("this machine has no non-loopback IPv4 address")


def test_team_server_reachable_by_ip_over_tls(tmp_path):
    """`make server` as the README's team example (MLFLOW_SERVER_HOST=0.0.0.0), with TLS: a request
    by the machine's IP is served (was 403 Invalid Host header); a `%` in MLFLOW_AUTH_DB_URI works
    (was a configparser crash); the backend store URI is on no command line; the auth config file
    is gone once the server stops (was left in the temp folder)."""
    ip = machine_ip()
    cert, key = self_signed(tmp_path / "tls", ip)
    temp, home = tmp_path / "temp", tmp_path / "server"
    temp.mkdir()
    server = Server(home, MLFLOW_SERVER_HOST="0.0.0.0", MLFLOW_TLS_CERTFILE=str(cert), MLFLOW_TLS_KEYFILE=str(key),
                    MLFLOW_AUTH_DB_URI=f"sqlite:///{home}/auth-p%25w.db", TMPDIR=str(temp),
                    MLFLOW_WORKERS="1",  # MLflow's own variable: one worker starts in a quarter of the time
                    MLFLOW_BACKEND_STORE_URI=f"sqlite:///{home}/backend-secret-marker.db")
    server.start(as_make_server=True)
    try:
        by_ip = f"https://{ip}:{server.port}"
        statuses = (_get(by_ip, auth=True, context=server.context), _get(by_ip, auth=False, context=server.context))
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in server.processes()]
        running = list(temp.glob("mlflow-auth-*.ini"))
    finally:
        server.stop()
    assert statuses == (200, 401)
    assert len(cmdlines) >= 3 and not any(b"secret-marker" in c for c in cmdlines), cmdlines
    assert len(running) == 1 and list(temp.glob("mlflow-auth-*.ini")) == []
    assert list(home.glob("auth-p*.db")) and list(home.glob("backend-secret-marker.db"))


def test_server_settings_are_checked():
    from pipeline.server import server_command

    base = {"MLFLOW_TRACKING_USERNAME": "a", "MLFLOW_TRACKING_PASSWORD": "b"}
    with pytest.raises(SystemExit, match="MLFLOW_DEFAULT_PERMISSION=WRITE"):
        server_command({**base, "MLFLOW_DEFAULT_PERMISSION": "WRITE"})
    with pytest.raises(SystemExit, match="MLFLOW_TLS_KEYFILE"):
        server_command({**base, "MLFLOW_TLS_CERTFILE": "cert.pem"})
    argv, _, ini = server_command({**base, "MLFLOW_ALLOWED_HOSTS": "mlflow.example.com"})
    allowed = argv[argv.index("--allowed-hosts") + 1].split(",")
    assert "default_permission = READ" in ini and "mlflow.example.com" in allowed and "127.0.0.1:5000" in allowed
    assert socket.gethostname() not in allowed  # loopback only: the machine's names are not needed
    assert "auth_cache_ttl_seconds = 60" in ini
    assert "auth_cache_ttl_seconds = 0" in server_command({**base, "MLFLOW_AUTH_CACHE_TTL_SECONDS": "0"})[2]
    with pytest.raises(SystemExit, match="MLFLOW_AUTH_CACHE_TTL_SECONDS=1m"):
        server_command({**base, "MLFLOW_AUTH_CACHE_TTL_SECONDS": "1m"})


def test_train_and_evaluate_against_server(server, project, credentials):
    project.set(**FAST)
    project.run("fetch_data")
    project.run("prepare")
    project.tracking_uri = server
    project.run("train")
    project.run("evaluate")
    train = json.loads(project.path("reports/train.json").read_text())
    promotion = json.loads(project.path("reports/promotion.json").read_text())
    # A shared registry's champion moves only from a main branch (CI on main, after review).
    refused = project.run("promote", check=False, env={"GITHUB_REF_NAME": "feature-x"})
    assert refused.returncode == 1 and "refusing to move @champion in the shared registry" in refused.stderr
    assert "from branch feature-x" in refused.stderr and "main" in refused.stderr
    project.run("promote", env={"GITHUB_REF_NAME": "main"})

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server)
    run = client.get_run(train["run_id"])
    assert run.info.status == "FINISHED"
    assert "test_accuracy" in run.data.metrics and EPOCH_KEYS["val_loss"] in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(train["run_id"])}
    assert {"loss_curves.png", "confusion_matrix.png", "train_history.csv"} <= artifacts
    version = client.get_model_version_by_alias("image-classifier", "champion")
    assert version.version == str(promotion["new_version"]) and version.run_id == train["run_id"]


def test_stage_fails_fast_when_server_is_down(project):
    project.set(**FAST)
    project.run("fetch_data")
    project.run("prepare")
    down = f"http://127.0.0.1:{free_port()}"
    project.tracking_uri = down
    start = time.monotonic()
    proc = project.run("train", check=False)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    # Starting Python and importing torch and mlflow alone takes 5-10 s on a 2-core machine; what this
    # guards against is MLflow's own retries, which take minutes.
    assert elapsed < 60, f"took {elapsed:.1f}s"
    assert down in proc.stderr and "unreachable" in proc.stderr
    assert "epoch 1" not in proc.stderr  # failed before any training
    assert not project.path("models/model.pt").exists()


def test_concurrent_promotions_through_the_server_end_on_the_best(server, credentials):
    """4 promotions at once through the server (its 4 workers), 5 trials: the alias ends on the best."""
    env = {"MLFLOW_TRACKING_URI": server, **credentials, "PYTHONPATH": str(REPO)}
    results = run_trials(env, trials=5, workers=4, seed=2)
    print(f"{len(results)} trials; final champion the best in {sum(r['best'] for r in results)}")
    assert [r for r in results if not r["best"]] == []


def test_runs_starting_at_once_record_their_shared_data_set(server, project, credentials):
    """8 runs of one experiment record the same data set at the same moment, 5 rounds. MLflow's store
    inserts a data set when absent, so all but one of those inserts clash on the table's key:
    log_dataset tries again, and every run ends with the data set as its input."""
    import threading

    import mlflow

    from pipeline import tracking

    project.tracking_uri = server
    runs, errors = 8, []

    def record(run_id: str, barrier: threading.Barrier) -> None:
        with mlflow.start_run(run_id=run_id):
            barrier.wait(timeout=60)
            try:
                tracking.log_dataset(project.root, name="builtin:digits", digest="d" * 32, context="training")
            except Exception as e:  # reported below
                errors.append(f"{type(e).__name__}: {e}")

    with inside_project(project):
        client = mlflow.MlflowClient()
        for trial in range(5):
            experiment = client.create_experiment(f"data-set-race-{trial}")
            run_ids = [client.create_run(experiment).info.run_id for _ in range(runs)]
            barrier = threading.Barrier(runs)
            threads = [threading.Thread(target=record, args=(run_id, barrier)) for run_id in run_ids]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert errors == [], f"trial {trial}"
            for run_id in run_ids:
                inputs = client.get_run(run_id).inputs.dataset_inputs
                assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("builtin:digits", "d" * 32)]
