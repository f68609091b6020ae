"""A throwaway PostgreSQL cluster from Debian's `postgresql` package, on a free loopback port: made with
initdb, run with pg_ctl, removed afterwards. PostgreSQL refuses to run as root, so as root its
programs run as the package's unprivileged `postgres` user."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers.mlflow_server import free_port


class Unavailable(RuntimeError):
    """No PostgreSQL server programs here."""


def bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise Unavailable("no PostgreSQL server: install Debian's `postgresql` package (.ci/run does)")
    return Path(found[-1]).parent


@dataclass
class Cluster:
    root: Path
    port: int
    user: str
    password: str
    db: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """SQLAlchemy's URL for psycopg2 (requirements-server.txt); a bare postgresql:// means psycopg 3."""
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.db}"


def _as_owner() -> dict:
    if os.geteuid() != 0:
        return {}
    owner = pwd.getpwnam("postgres")
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": [],
            "env": {**os.environ, "HOME": owner.pw_dir or "/tmp", "USER": "postgres", "LOGNAME": "postgres"}}


def start(db: str = "mlflow", user: str = "mlflow", password: str = "pg-s3cret") -> Cluster:
    """A new cluster with database `db` owned by `user`, in the system's temp folder (pytest's is
    private to root, and the `postgres` user must reach its files)."""
    bin_, owner = bin_dir(), _as_owner()
    root = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    (root / "sock").mkdir()
    if owner:
        for path in (root, root / "sock"):
            os.chown(path, owner["user"], owner["group"])
    (root / "pwfile").write_text(password + "\n")
    if owner:
        os.chown(root / "pwfile", owner["user"], owner["group"])
    cluster = Cluster(root, free_port(), user, password, db)
    began = time.monotonic()
    subprocess.run([str(bin_ / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--pwfile", str(root / "pwfile"),
                    "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
                   check=True, capture_output=True, **owner)
    cluster.timings["initdb_s"] = time.monotonic() - began
    began = time.monotonic()
    options = f"-p {cluster.port} -k {root / 'sock'} -h 127.0.0.1 -c fsync=off -c full_page_writes=off"
    subprocess.run([str(bin_ / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"), "-w", "-t", "60",
                    "-o", options, "start"], check=True, capture_output=True, **owner)
    cluster.timings["start_s"] = time.monotonic() - began
    psql = [str(bin_ / "psql"), "-h", str(root / "sock"), "-p", str(cluster.port), "-U", "postgres", "-d", "postgres",
            "-v", "ON_ERROR_STOP=1", "-q"]
    subprocess.run([*psql, "-c", f"CREATE ROLE {user} LOGIN PASSWORD '{password}'"], check=True, **owner)
    subprocess.run([*psql, "-c", f"CREATE DATABASE {db} OWNER {user}"], check=True, **owner)
    (root / "pwfile").unlink()
    return cluster


def stop(cluster: Cluster) -> None:
    subprocess.run([str(bin_dir() / "pg_ctl"), "-D", str(cluster.root / "data"), "-m", "fast", "-w", "stop"],
                   capture_output=True, **_as_owner())
    shutil.rmtree(cluster.root, ignore_errors=True)
