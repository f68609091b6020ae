"""Processes the tests start and watch: in a session of their own, so a test can signal or kill -9 a
whole `dvc repro` with its stage, the way a terminal's Ctrl-C, a CI cancel or the OOM killer does, and
find the stage's own process among them (/proc, no psutil)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes in process group `pgid`, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append((int(entry.name), cmd))
    return out


class Background:
    """A command in its own session and process group (a test can signal all of it, as a terminal
    or CI does), its stdout and stderr in one log file."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict, log_path: Path):
        self.cmd, self.log_path = cmd, log_path
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def send_signal(self, sig: int) -> None:
        """To the command's own process (not its group)."""
        self.proc.send_signal(sig)

    def members(self) -> list[tuple[int, str]]:
        return group_members(self.pid)

    def find(self, needle: str) -> int | None:
        return next((pid for pid, cmd in self.members() if needle in cmd), None)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.pid, sig)

    def wait(self, timeout: float = 180) -> int:
        """Wait for the command and every process of its group (a stage that outlives a killed dvc)."""
        try:
            rc = self.proc.wait(timeout=timeout)
            deadline = time.monotonic() + timeout
            while self.members() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not self.members(), f"still running: {self.members()}"
            return rc
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")


def poll(check, what: str, timeout: float = 120, bg: Background | None = None, interval: float = 0.003):
    """Call `check()` until it returns something truthy (returned); fail if `bg` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if bg is not None and not bg.alive():
            raise AssertionError(f"{' '.join(bg.cmd)} exited {bg.proc.returncode} before {what}:\n{bg.output()[-3000:]}")
        time.sleep(interval)
    if bg is not None:
        bg.kill()
    raise AssertionError(f"no {what} within {timeout}s" + (f":\n{bg.output()[-3000:]}" if bg else ""))
