"""A real MLflow tracking server on loopback, started the way `make server` starts it (basic auth,
proxied artifacts), with its stores under one folder: killed and started again, it is the same server
(same port, runs, users)."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers.project import REPO

USER, PASSWORD = "tests-admin", "tests-s3cret-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, **settings: str):
        """`settings`: more of pipeline.server's environment variables (MLFLOW_BACKEND_STORE_URI, ...)."""
        self.home, self.port = home, free_port()
        home.mkdir(parents=True, exist_ok=True)
        tls = "MLFLOW_TLS_CERTFILE" in settings
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        # with TLS, requests trust the server's own (self-signed) certificate
        self.context = ssl.create_default_context(cafile=settings["MLFLOW_TLS_CERTFILE"]) if tls else None
        self.settings = {
            "MLFLOW_SERVER_PORT": str(self.port),
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{home / 'server.db'}",
            "MLFLOW_ARTIFACTS_DESTINATION": str(home / "artifacts"),
            "MLFLOW_AUTH_DB_URI": f"sqlite:///{home / 'auth.db'}",
            "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD, **settings}
        self.proc: subprocess.Popen | None = None
        self.starts: list[float] = []  # seconds each start took

    def start(self, timeout: float = 120, as_make_server: bool = False) -> None:
        """Start and wait until /health answers. By default `make server`'s command
        (pipeline.server.server_command) with one worker instead of MLflow's 4: a quarter of the
        start-up time, the same server; `as_make_server`: `python -m pipeline.server` itself."""
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.settings}
        if as_make_server:
            argv = [sys.executable, "-m", "pipeline.server"]
        else:
            from pipeline.server import server_command

            argv, env, auth_ini = server_command(env)
            (self.home / "auth.ini").write_text(auth_ini)
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.home / "auth.ini")
            argv = [*argv, "--workers", "1"]
        log = open(self.home / "server.log", "a")
        began = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=self.home, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        while time.monotonic() - began < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log()}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2, context=self.context).close()
                self.starts.append(time.monotonic() - began)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise AssertionError(f"server did not start: {self.log()}")

    def log(self) -> str:
        return (self.home / "server.log").read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)

    def processes(self) -> list[int]:
        """The pids of the server's process group (`make server`'s process, mlflow's, uvicorn's)."""
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and os.getpgid(int(entry.name)) == self.proc.pid:
                    pids.append(int(entry.name))
            except OSError:  # exited meanwhile
                pass
        return pids

    def client_env(self, **extra) -> dict:
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": USER,
                "MLFLOW_TRACKING_PASSWORD": PASSWORD, **extra}

    def client(self, monkeypatch):
        from mlflow import MlflowClient

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        return MlflowClient(tracking_uri=self.url)
