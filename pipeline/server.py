"""`make server`: an MLflow tracking server for a team, with basic auth and proxied artifacts.

Settings come from the environment (nothing is a secret in the repo):

| variable | default |
|---|---|
| MLFLOW_SERVER_HOST | 127.0.0.1 (loopback only; 0.0.0.0 to serve a network) |
| MLFLOW_SERVER_PORT | 5000 |
| MLFLOW_BACKEND_STORE_URI | sqlite:///mlflow-server.db (PostgreSQL: postgresql://user:pw@host/db, with requirements-server.txt) |
| MLFLOW_ARTIFACTS_DESTINATION | ./mlartifacts (or s3://bucket/path, gs://…) |
| MLFLOW_AUTH_DB_URI | sqlite:///mlflow-auth.db (the users and permissions) |
| MLFLOW_ALLOWED_HOSTS | more Host headers to accept, comma-separated, `*` patterns allowed (e.g. the DNS name a reverse proxy forwards) |
| MLFLOW_DEFAULT_PERMISSION | READ: what every user may do with experiments and models they did not create (READ, EDIT, MANAGE, NO_PERMISSIONS) |
| MLFLOW_TLS_CERTFILE / MLFLOW_TLS_KEYFILE | unset: plain http. Both set: https (PEM files) |
| MLFLOW_AUTH_CACHE_TTL_SECONDS | 60: a worker that has checked a user's password accepts it again for this long without hashing it anew (0: hash every request) |
| MLFLOW_FLASK_SERVER_SECRET_KEY | random per start (set it when running several replicas) |
| MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD | required: the admin account created on first start |

The Host headers accepted follow the bind address: loopback names always; with a specific address,
that address; with 0.0.0.0 or ::, every address and name of this machine. Other names (a DNS alias,
a reverse proxy's) go in MLFLOW_ALLOWED_HOSTS. The backend store URI, which can hold a database
password, reaches MLflow through its environment, never the command line (visible in `ps`).

Clients (the stages, `mlflow ui` users) reach it with MLFLOW_TRACKING_URI=http(s)://<host>:<port>
and the same MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD variables.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile

PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
ANY_ADDRESS = ("0.0.0.0", "::", "")


def server_command(env: dict[str, str]) -> tuple[list[str], dict[str, str], str]:
    """(argv, environment, auth config text) for `mlflow server`; raises SystemExit on missing
    credentials or bad settings, so the server never starts with a default admin password."""
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if not user or not password:
        raise SystemExit("error: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD: they become "
                         "the server's admin account (there is no default password)")
    host = env.get("MLFLOW_SERVER_HOST", "127.0.0.1")
    port = env.get("MLFLOW_SERVER_PORT", "5000")
    argv = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
            "--host", host, "--port", port,
            "--artifacts-destination", env.get("MLFLOW_ARTIFACTS_DESTINATION", "./mlartifacts"),
            "--serve-artifacts", "--allowed-hosts", ",".join(allowed_hosts(host, port, env))]
    # The admin password and the backend store URI (a database password) reach MLflow through its
    # own variables, never a file or the command line.
    child_env = {**env, "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                 "MLFLOW_BACKEND_STORE_URI": env.get("MLFLOW_BACKEND_STORE_URI", "sqlite:///mlflow-server.db")}
    tls = _tls_options(env)
    if tls:
        child_env["MLFLOW_UVICORN_OPTS"] = " ".join(filter(None, [env.get("MLFLOW_UVICORN_OPTS"), tls]))
    # CSRF key of the auth app's forms: set it to share one across server replicas; else per start.
    child_env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    return argv, child_env, auth_config(env, user)


def auth_config(env: dict[str, str], user: str) -> str:
    """The basic-auth app's ini file. MLflow reads it with configparser's interpolation, so a `%` in
    a value (a URL-encoded password in MLFLOW_AUTH_DB_URI) is written as `%%`."""
    permission = env.get("MLFLOW_DEFAULT_PERMISSION", "READ")
    if permission not in PERMISSIONS:
        raise SystemExit(f"error: MLFLOW_DEFAULT_PERMISSION={permission}: not one of {', '.join(PERMISSIONS)}")
    # Checking a password hash costs 0.17 s of CPU here (scrypt) and a training run makes a request an
    # epoch and more; MLflow's cache skips the check for credentials a worker accepted within the TTL.
    # The price: a changed or deleted password keeps working on other workers until the TTL is out.
    ttl = env.get("MLFLOW_AUTH_CACHE_TTL_SECONDS", "60")
    if not ttl.isdigit():
        raise SystemExit(f"error: MLFLOW_AUTH_CACHE_TTL_SECONDS={ttl}: expected whole seconds (0 turns the cache off)")
    values = {"default_permission": permission,
              "database_uri": env.get("MLFLOW_AUTH_DB_URI", "sqlite:///mlflow-auth.db"),
              "admin_username": user,
              "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
              "auth_cache_ttl_seconds": ttl}
    return "\n".join(["[mlflow]", *(f"{k} = {v.replace('%', '%%')}" for k, v in values.items()), ""])


def allowed_hosts(host: str, port: str, env: dict[str, str]) -> list[str]:
    """Host headers to accept (bare and with the port): the loopback names, the bind address (every
    address and name of this machine when bound to all of them), and MLFLOW_ALLOWED_HOSTS."""
    names = [*LOOPBACK, *(machine_addresses() if host in ANY_ADDRESS else [host])]
    extra = [h.strip() for h in env.get("MLFLOW_ALLOWED_HOSTS", "").split(",") if h.strip()]
    out = []
    for name in names:
        name = f"[{name}]" if ":" in name and not name.startswith("[") else name  # IPv6 in a Host header
        out += [name, f"{name}:{port}"]
    return list(dict.fromkeys(out + extra))


def machine_addresses() -> list[str]:
    """This machine's host names and the addresses of its network interfaces."""
    names = {socket.gethostname(), socket.getfqdn()}
    try:
        import psutil

        names |= {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family in (socket.AF_INET, socket.AF_INET6)}
    except ImportError:  # psutil comes with MLflow's system metrics; without it, what DNS says
        with contextlib.suppress(OSError):
            names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    return sorted(n for n in names if n)


def _tls_options(env: dict[str, str]) -> str:
    """uvicorn's TLS options from MLFLOW_TLS_CERTFILE and MLFLOW_TLS_KEYFILE ('' when neither)."""
    cert, key = env.get("MLFLOW_TLS_CERTFILE"), env.get("MLFLOW_TLS_KEYFILE")
    if not cert and not key:
        return ""
    if not (cert and key):
        raise SystemExit("error: set both MLFLOW_TLS_CERTFILE and MLFLOW_TLS_KEYFILE (PEM files), or neither")
    for name, path in (("MLFLOW_TLS_CERTFILE", cert), ("MLFLOW_TLS_KEYFILE", key)):
        if not os.path.isfile(path):
            raise SystemExit(f"error: {name}={path}: no such file")
    return f"--ssl-certfile {shlex.quote(cert)} --ssl-keyfile {shlex.quote(key)}"


def main() -> int:
    """Run `mlflow server` as a child, passing Ctrl-C and SIGTERM on; the auth config lives in a
    temp file for as long as the server runs (its workers read it when they start) and is removed
    when it stops."""
    argv, env, auth_ini = server_command(dict(os.environ))
    fd, path = tempfile.mkstemp(prefix="mlflow-auth-", suffix=".ini")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(auth_ini)
        env["MLFLOW_AUTH_CONFIG_PATH"] = path
        scheme = "https" if "--ssl-certfile" in env.get("MLFLOW_UVICORN_OPTS", "") else "http"
        print(f"mlflow server on {scheme}://{argv[argv.index('--host') + 1]}:{argv[argv.index('--port') + 1]} "
              f"(auth config {path}, removed at exit)", flush=True)
        child = subprocess.Popen(argv, env=env)

        def forward(signum, frame):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        return child.wait()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
