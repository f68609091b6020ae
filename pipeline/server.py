"""`make server`: an MLflow tracking server for a team, with basic auth and proxied artifacts.

Settings come from the environment (nothing is a secret in the repo):

| variable | default |
|---|---|
| MLFLOW_SERVER_HOST | 127.0.0.1 (loopback only; 0.0.0.0 to serve a network) |
| MLFLOW_SERVER_PORT | 5000 |
| MLFLOW_BACKEND_STORE_URI | sqlite:///mlflow-server.db (PostgreSQL: postgresql://user:pw@host/db, with requirements-server.txt) |
| MLFLOW_ARTIFACTS_DESTINATION | ./mlartifacts (or s3://bucket/path, gs://…) |
| MLFLOW_AUTH_DB_URI | sqlite:///mlflow-auth.db (the users and permissions) |
| MLFLOW_ALLOWED_HOSTS | localhost,127.0.0.1,<host>:<port> |
| MLFLOW_FLASK_SERVER_SECRET_KEY | random per start (set it when running several replicas) |
| MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD | required: the admin account created on first start |

Clients (the stages, `mlflow ui` users) reach it with MLFLOW_TRACKING_URI=http://<host>:<port> and
the same MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD variables.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile


def server_command(env: dict[str, str]) -> tuple[list[str], dict[str, str], str]:
    """(argv, environment, auth config text) for `mlflow server`; raises SystemExit on missing
    credentials, so the server never starts with a default admin password."""
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if not user or not password:
        raise SystemExit("error: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD: they become "
                         "the server's admin account (there is no default password)")
    host = env.get("MLFLOW_SERVER_HOST", "127.0.0.1")
    port = env.get("MLFLOW_SERVER_PORT", "5000")
    allowed = env.get("MLFLOW_ALLOWED_HOSTS", f"localhost,127.0.0.1,localhost:{port},127.0.0.1:{port},{host}:{port}")
    auth_ini = "\n".join([
        "[mlflow]",
        "default_permission = READ",
        f"database_uri = {env.get('MLFLOW_AUTH_DB_URI', 'sqlite:///mlflow-auth.db')}",
        f"admin_username = {user}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "",
    ])
    argv = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
            "--host", host, "--port", port,
            "--backend-store-uri", env.get("MLFLOW_BACKEND_STORE_URI", "sqlite:///mlflow-server.db"),
            "--artifacts-destination", env.get("MLFLOW_ARTIFACTS_DESTINATION", "./mlartifacts"),
            "--serve-artifacts", "--allowed-hosts", allowed]
    # The admin password reaches MLflow through its own variable, never a file or the command line.
    child_env = {**env, "MLFLOW_AUTH_ADMIN_PASSWORD": password}
    # CSRF key of the auth app's forms: set it to share one across server replicas; else per start.
    child_env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    return argv, child_env, auth_ini


def main() -> None:
    argv, env, auth_ini = server_command(dict(os.environ))
    fd, path = tempfile.mkstemp(prefix="mlflow-auth-", suffix=".ini")
    with os.fdopen(fd, "w") as f:
        f.write(auth_ini)
    env["MLFLOW_AUTH_CONFIG_PATH"] = path
    print(f"mlflow server on http://{argv[argv.index('--host') + 1]}:{argv[argv.index('--port') + 1]} "
          f"(auth config {path})", flush=True)
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    main()
