"""The one entry point every stage's `python -m pipeline.<stage>` goes through."""

from __future__ import annotations

import functools
import logging
import signal
import sys
from typing import Callable

from pipeline.config import PARAMS_FILE, Params, PipelineError, load_params

log = logging.getLogger("pipeline")


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
