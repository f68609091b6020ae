"""Concurrent promotions: worker processes that, trial after trial, wait at a barrier and then promote
their version at the same moment, against one tracking store (sqlite or a server)."""

from __future__ import annotations

import multiprocessing
import os
import random
import time

from mlflow import MlflowClient

TEST_HASH = "f" * 64
METRIC = "accuracy"


def _naive_promote(cfg, name: str, version: str, test_hash: str) -> None:
    """The read-compare-write a promotion without convergence does: the last writer wins."""
    from pipeline import champion, registry

    score = champion.score_on(registry.version_tags(name, version), test_hash, cfg.promote_metric)
    holder = registry.alias_holder(name)
    best = None if holder is None else champion.score_on(registry.version_tags(name, holder), test_hash,
                                                         cfg.promote_metric)
    time.sleep(0.05)  # the gap between reading the champion and writing the alias, widened
    if champion.decide(score, best, cfg.promote_min_delta, cfg.promote_metric)[0]:
        try:
            registry.set_champion(name, version)
        except Exception:  # two first writes of the alias: MLflow's INSERT fails for one of them
            pass


def _worker(env: dict, naive: bool, jobs, barrier, errors) -> None:
    os.environ.update(env)
    import mlflow

    from pipeline import champion
    from pipeline.config import Evaluate

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    cfg = Evaluate(promote_metric=METRIC, promote_min_delta=0.0, batch_size=64)
    promote = _naive_promote if naive else champion.promote
    while True:
        job = jobs.get()
        if job is None:
            return
        name, version = job
        barrier.wait(timeout=120)
        try:
            promote(cfg, name, version, TEST_HASH)
        except Exception as e:  # reported to the test, which fails on it
            errors.put(f"{name} v{version}: {type(e).__name__}: {e}")
        barrier.wait(timeout=120)


def run_trials(env: dict, trials: int, workers: int, naive: bool = False, seed: int = 0) -> list[dict]:
    """`trials` rounds of `workers` concurrent promotions, each of a new version of a fresh registered
    model whose versions have random scores (ties included); the first round's model starts with a
    champion. Returns per trial: the final alias holder and whether it has the top score."""
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    rng = random.Random(seed)
    ctx = multiprocessing.get_context("spawn")
    jobs, errors = ctx.Queue(), ctx.Queue()
    barrier = ctx.Barrier(workers + 1)
    procs = [ctx.Process(target=_worker, args=(env, naive, jobs, barrier, errors)) for _ in range(workers)]
    for p in procs:
        p.start()
    results = []
    try:
        for trial in range(trials):
            name = f"race-{'naive' if naive else 'converge'}-{seed}-{trial}"
            client.create_registered_model(name)
            scores = {}
            champion = trial % 2 == 0  # half the trials start with a champion in place
            for i in range(workers + champion):
                score = round(rng.choice([0.5, 0.6, 0.7, 0.8, 0.9]), 2)
                v = client.create_model_version(name, "s3://race-test/model").version
                client.set_model_version_tag(name, v, "test_data_hash", TEST_HASH)
                client.set_model_version_tag(name, v, f"test_{METRIC}", str(score))
                scores[str(v)] = score
            contenders = list(scores)
            if champion:
                client.set_registered_model_alias(name, "champion", contenders[0])
                client.set_model_version_tag(name, contenders[0], "champion.candidate", "initial")
                contenders = contenders[1:]
            for v in contenders:
                jobs.put((name, v))
            barrier.wait(timeout=120)  # all start together
            barrier.wait(timeout=300)  # all done
            top = max(scores.values())
            holder = client.get_model_version_by_alias(name, "champion").version
            # Versions that tie on the top score are equally best: a tie never replaces a champion,
            # so which of them holds the alias depends on who got there first.
            results.append({"trial": trial, "final": int(holder), "best": scores[str(holder)] == top,
                            "scores": scores})
    finally:
        for _ in procs:
            jobs.put(None)
        for p in procs:
            p.join(timeout=60)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        raise AssertionError("promotions failed: " + "; ".join(failures[:5]))
    return results


def _configure_worker(jobs, barrier, results) -> None:
    from pipeline import tracking

    while True:
        uri = jobs.get()
        if uri is None:
            return
        os.environ["MLFLOW_TRACKING_URI"] = uri
        barrier.wait(timeout=120)
        try:
            tracking.configure("image-classifier")
            results.put("ok")
        except Exception as e:  # the test reports them
            results.put(f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
        barrier.wait(timeout=120)


def open_fresh_stores(folder, trials: int, workers: int) -> list[str]:
    """`trials` rounds of `workers` processes opening one new sqlite store (tracking.configure) at the
    same instant; returns every outcome ("ok" or the error)."""
    ctx = multiprocessing.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    barrier = ctx.Barrier(workers + 1)
    procs = [ctx.Process(target=_configure_worker, args=(jobs, barrier, results)) for _ in range(workers)]
    for p in procs:
        p.start()
    outcomes = []
    try:
        for trial in range(trials):
            uri = f"sqlite:///{folder / f'fresh{trial}.db'}?timeout=60"
            for _ in procs:
                jobs.put(uri)
            barrier.wait(timeout=120)
            barrier.wait(timeout=300)
            outcomes += [results.get(timeout=60) for _ in procs]
    finally:
        for _ in procs:
            jobs.put(None)
        for p in procs:
            p.join(timeout=60)
    return outcomes
