"""The one entry point every stage's `python -m pipeline.<stage>` goes through."""

from __future__ import annotations

import functools
import logging
import signal
import sys
import time
from typing import Callable

from pipeline.config import PARAMS_FILE, Params, load_params
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

PROGRESS_LOG_S = 10.0  # with no terminal to draw a bar on, a progress line this often


def progress(desc: str, total: int | None = None, unit: str = "img"):
    """A tqdm bar on a terminal. Otherwise (CI, a log file, a queued `dvc exp`), a log line every
    PROGRESS_LOG_S seconds, so that a long fetch or prepare is not silent for minutes."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False)
    return _LoggedProgress(desc, total, unit)


class _LoggedProgress:
    """tqdm's update/close/context manager, as periodic log lines."""

    def __init__(self, desc: str, total: int | None, unit: str):
        self.desc, self.total, self.unit, self.n = desc, total, unit, 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_LOG_S:
            self.last = now
            scale, unit = (2**20, "MiB") if self.unit == "B" else (1, self.unit)
            done = f"{self.n / scale:.0f}" + (f"/{self.total / scale:.0f}" if self.total else "")
            log.info("%s: %s %s, %.0f %s/s", self.desc, done, unit, self.n / scale / (now - self.start), unit)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """`--section.key value` or `--section.key=value` pairs (how `mlflow run -P` passes them)."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise PipelineError(f"unexpected argument {arg!r}; expected --section.key VALUE overrides")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(argv):
            key, value = arg[2:], argv[i + 1]
            i += 1
        else:
            raise PipelineError(f"{arg}: missing a value")
        out[key] = value
        i += 1
    return out


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so stages clean up as for Ctrl-C."""


_shield = {"depth": 0, "pending": None}


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_signal(signum, frame):
    if _shield["depth"]:  # inside a shielded call: interrupt when it returns, not half-way
        _shield["pending"] = signum
        return
    raise _interrupt(signum)


def shielded(fn):
    """Defer SIGINT/SIGTERM until `fn` returns. For MLflow calls: an interrupt half-way through
    one can leave its store session unusable, and then the run could not be marked KILLED."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _shield["depth"] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _shield["depth"] -= 1
            if not _shield["depth"] and _shield["pending"] is not None:
                signum, _shield["pending"] = _shield["pending"], None
                raise _interrupt(signum)

    return wrapper


def run_stage(main: Callable[[Params], None], argv: list[str] | None = None) -> None:
    """Load params.yaml (plus overrides), run `main`, and turn PipelineErrors into one clear line
    and exit status 1; interrupts exit 130, other crashes keep their traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        params = load_params(PARAMS_FILE, parse_overrides(sys.argv[1:] if argv is None else argv))
        main(params)
    except PipelineError as e:
        log.error("error: %s", e)
        sys.exit(1)
    except Terminated:
        log.error("terminated (SIGTERM)")
        sys.exit(143)
    except KeyboardInterrupt:
        log.error("interrupted (SIGINT)")
        sys.exit(130)
