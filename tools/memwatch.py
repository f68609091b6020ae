"""`python -m tools.memwatch MODULE [ARGS...]`: run `python -m MODULE ARGS...` and, at its exit,
print its memory high-water marks for tools.bench:

    VmHWM: <kB>          peak resident set of the module's own process (file-backed pages included,
                         e.g. a memory-mapped output it writes)
    TreeAnonHWM: <kB>    peak anonymous memory (heap, not files) of the process and all its child
                         processes together (prepare's decode workers), sampled every 20 ms

Imports nothing heavy itself, so the numbers are the module's. Not getrusage: a child's ru_maxrss
keeps the high-water mark of the process it was forked from (the benchmark, with torch loaded).
"""

import atexit
import os
import runpy
import sys
import threading
import time

SAMPLE_S = 0.02


def _status(pid: int | str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key + ":")), 0)
    except (OSError, ValueError):  # exited meanwhile
        return 0


def _tree(pid: int | str) -> list[str]:
    pids, todo = [], [str(pid)]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += f.read().split()
        except OSError:
            pass
    return pids


def main() -> None:
    peak = [0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], sum(_status(p, "RssAnon") for p in _tree(os.getpid())))
            time.sleep(SAMPLE_S)

    def report() -> None:
        print(f"VmHWM: {_status('self', 'VmHWM')} kB", flush=True)
        print(f"TreeAnonHWM: {peak[0]} kB", flush=True)

    threading.Thread(target=sample, daemon=True).start()
    atexit.register(report)
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
