"""train.nproc=2: the train stage under torchrun with DistributedDataParallel over gloo on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from helpers.project import REPO, Project
from helpers.training import EPOCH_KEYS, EPOCH_METRICS, wait_for_checkpoint

FAST = dict(prepare__image_size=12, train__hidden_units=12, train__epochs=6, train__patience=10,
            train__batch_size=32)


def new_project(root, mlflow_template, nproc: int) -> Project:
    project = Project.create(root, mlflow_template, **FAST, train__nproc=nproc)
    project.run("fetch_data")
    project.run("prepare")
    return project


def results(project) -> dict:
    return {"summary": json.loads(project.path("reports/train.json").read_text()),
            "history": pd.read_csv(project.path("reports/train_history.csv")),
            "model": torch.load(project.path("models/model.pt"), map_location="cpu", weights_only=True)}


def the_run(project):
    client = MlflowClient(tracking_uri=project.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])  # one run
    return client, run


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, mlflow_template):
    """An uninterrupted 2-process train: its project, stderr and results."""
    project = new_project(tmp_path_factory.mktemp("ddp") / "two", mlflow_template, nproc=2)
    proc = project.run("train", timeout=600)
    return project, proc.stderr, results(project)


def test_two_processes_log_one_run_with_global_metrics(ddp_reference, tmp_path, mlflow_template):
    project, stderr, two = ddp_reference
    assert stderr.count("epoch 1/6") == 1  # rank 0 alone reports
    assert len(two["history"]) == 6
    client, run = the_run(project)  # one run, from rank 0
    assert run.info.run_id == two["summary"]["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["train.processes"] == "2" and run.data.params["train.nproc"] == "2"
    assert len(client.get_metric_history(run.info.run_id, EPOCH_KEYS["val_loss"])) == 6
    assert not list(project.path(".checkpoints").glob("*.pt"))

    # Accuracy comparable to one process on the same data and params.
    one = new_project(tmp_path / "single", mlflow_template, nproc=1)
    one.run("train", timeout=600)
    single = results(one)["summary"]
    assert two["summary"]["best_val_acc"] > 0.8 and single["best_val_acc"] > 0.8
    assert abs(two["summary"]["best_val_acc"] - single["best_val_acc"]) < 0.1


def test_killed_ddp_run_resumes_to_the_same_result(ddp_reference, tmp_path, mlflow_template):
    """kill -9 of torchrun and both workers after a checkpoint; the re-run resumes under DDP in the same
    MLflow run and ends where the uninterrupted 2-process run ended."""
    from pipeline.checkpoint import read_checkpoint

    _, _, ref = ddp_reference
    project = new_project(tmp_path / "killed", mlflow_template, nproc=2)
    ckpt_path = project.path(".checkpoints/train.pt")
    bg = project.start_stage("train")
    left = wait_for_checkpoint(project, bg, epoch=2)
    bg.signal_group(signal.SIGKILL)  # the stage, torchrun and both workers: nothing runs a handler
    bg.proc.wait(timeout=60)
    out = bg.output()
    assert 2 <= left["epoch"] < 6, out[-3000:]
    # torchrun's workers, in sessions of their own, get SIGTERM as their parent dies: rank 0 ends the run
    # KILLED. Orphaned, they would train on, finish the run and delete the checkpoint.
    deadline = time.monotonic() + 60
    while the_run(project)[1].info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    left = read_checkpoint(ckpt_path)  # the last one written before the kill
    _, run = the_run(project)
    assert run.info.status == "KILLED" and run.info.run_id == left["run_id"]
    assert left["epoch"] < 6

    resumed = project.run("train", timeout=600)
    assert f"resuming MLflow run {left['run_id']} from epoch {left['epoch']}" in resumed.stderr, resumed.stderr
    client, run = the_run(project)
    assert run.info.run_id == left["run_id"] and run.info.status == "FINISHED"
    for key in EPOCH_METRICS:  # each epoch logged once, the ones before the kill included
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, EPOCH_KEYS[key])) == list(range(1, 7)), key
    mine = results(project)
    pd.testing.assert_frame_equal(mine["history"].drop(columns=["epoch_seconds", "images_per_second"]),
                                  ref["history"].drop(columns=["epoch_seconds", "images_per_second"]))
    assert mine["model"]["state_dict"].keys() == ref["model"]["state_dict"].keys()
    assert all(torch.equal(v, ref["model"]["state_dict"][k]) for k, v in mine["model"]["state_dict"].items())


SYNC_BN_RANK = """
import sys, torch, torch.distributed as dist
from pipeline.distributed import convert_sync_batchnorm
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
x, w = torch.randn(12, 3, 5, 5) * 3 + 1, torch.randn(12, 3, 5, 5)  # the full batch and a loss weighting
half = slice(0, 5) if rank == 0 else slice(5, 12)  # unequal shares: counts must be all-reduced too
net = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.3)).train())
net[0].weight.data = torch.tensor([0.5, 1.0, 2.0]); net[0].bias.data = torch.tensor([0.1, -0.2, 0.3])
xs = x[half].clone().requires_grad_()
y = net(xs)
(y * w[half]).sum().backward()
torch.save({"y": y.detach(), "dx": xs.grad, "dweight": net[0].weight.grad, "dbias": net[0].bias.grad,
            "running_mean": net[0].running_mean, "running_var": net[0].running_var,
            "type": type(net[0]).__name__}, sys.argv[1] + f"/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_cpu_sync_batchnorm_equals_batchnorm_over_the_whole_batch(tmp_path):
    """Two gloo ranks with 5 and 7 of 12 images: outputs, input gradients, summed parameter gradients
    and running statistics equal plain BatchNorm2d's on all 12 in one process."""
    (tmp_path / "rank.py").write_text(SYNC_BN_RANK)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "rank.py"), str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["type"] == "CPUSyncBatchNorm"

    torch.manual_seed(0)
    x, w = torch.randn(12, 3, 5, 5) * 3 + 1, torch.randn(12, 3, 5, 5)
    bn = torch.nn.BatchNorm2d(3, momentum=0.3).train()
    bn.weight.data = torch.tensor([0.5, 1.0, 2.0]); bn.bias.data = torch.tensor([0.1, -0.2, 0.3])
    x.requires_grad_()
    y = bn(x)
    (y * w).sum().backward()
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([r0["dx"], r1["dx"]]), x.grad, **close)
    torch.testing.assert_close(r0["dweight"] + r1["dweight"], bn.weight.grad, **close)
    torch.testing.assert_close(r0["dbias"] + r1["dbias"], bn.bias.grad, **close)
    for r in (r0, r1):
        torch.testing.assert_close(r["running_mean"], bn.running_mean, **close)
        torch.testing.assert_close(r["running_var"], bn.running_var, **close)


def test_two_nodes_one_job_resume_after_a_node_is_killed(ddp_reference, tmp_path, mlflow_template):
    """2 nodes x 1 process (PIPELINE_NNODES=2, torchrun's c10d rendezvous on loopback), sharing one
    workspace as nodes share storage: one MLflow run for the job, logged by rank 0. kill -9 of one
    node after a checkpoint fails the other; both started again resume the job in the same run, to
    the 2-process run's result."""
    from helpers.mlflow_server import free_port

    _, _, ref = ddp_reference
    project = new_project(tmp_path / "nodes", mlflow_template, nproc=1)
    env = {"PIPELINE_NNODES": "2", "PIPELINE_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "PIPELINE_RDZV_ID": "t",
           "PIPELINE_THREADS": "1"}  # as each of the reference's 2 processes on these 2 cores
    first = [project.start_stage("train", env=env) for _ in range(2)]
    left = wait_for_checkpoint(project, first[0], epoch=2)
    first[1].signal_group(signal.SIGKILL)  # one node: its stage and torchrun; its worker dies with them
    for bg in first:
        bg.proc.wait(timeout=120)
    assert first[0].returncode != 0 and "torchrun (2 node(s)" in first[0].output(), first[0].output()[-2000:]
    deadline = time.monotonic() + 60
    while the_run(project)[1].info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)

    again = [project.start_stage("train", env=env) for _ in range(2)]
    for bg in again:
        assert bg.wait(timeout=600) == 0, bg.output()[-3000:]
    out = "".join(bg.output() for bg in again)
    assert out.count(f"resuming MLflow run {left['run_id']}") == 1, out[-3000:]  # rank 0 resumes, once
    client, run = the_run(project)  # one run for the whole job
    assert run.info.run_id == left["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["train.nodes"] == "2" and run.data.tags["train.processes"] == "2"
    for key in EPOCH_METRICS:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, EPOCH_KEYS[key])) == list(range(1, 7))
    mine = results(project)
    pd.testing.assert_frame_equal(mine["history"].drop(columns=["epoch_seconds", "images_per_second"]),
                                  ref["history"].drop(columns=["epoch_seconds", "images_per_second"]))
