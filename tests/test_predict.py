"""predict (CLI), the registered model's pyfunc flavour and `mlflow models serve`, all checked against
what evaluate predicted for the same test images."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers.project import inside_project

from pipeline import predict

NAME = "image-classifier"
CHAMPION = f"models:/{NAME}@champion"


def evaluate_predictions(project) -> list[dict]:
    """reports/predictions.csv rows, in test-split order."""
    with open(project.path("reports/predictions.csv"), newline="") as f:
        return list(csv.DictReader(f))


def confident(project, n: int) -> list[dict]:
    """n test images evaluate predicted with probability > 0.6 (no near-tie between two classes),
    from different predicted classes where possible."""
    rows = [r for r in evaluate_predictions(project) if float(r["probability"]) > 0.6]
    picked, seen = [], set()
    for r in rows:
        if r["predicted"] not in seen:
            picked.append(r)
            seen.add(r["predicted"])
    picked += [r for r in rows if r not in picked]
    assert len(picked) >= n, "the trained model is too unsure to pick test images"
    return picked[:n]


def test_predict_one_image(eval_done):
    row = confident(eval_done, 1)[0]
    image = eval_done.path("data/raw") / row["file"]
    proc = eval_done.run("predict", str(image))  # default model: models/model.pt
    assert proc.returncode == 0 and "error" not in proc.stderr.lower()
    out = proc.stdout.strip()
    prefix = f"{image}: {row['predicted']} ("
    assert out.startswith(prefix), out
    assert float(out[len(prefix):].rstrip(")")) == pytest.approx(float(row["probability"]), abs=2e-4)


def test_predict_folder_with_bad_files_from_the_registry(eval_done, tmp_path):
    rows = confident(eval_done, 3)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, r in enumerate(rows):
        shutil.copy(eval_done.path("data/raw") / r["file"], folder / f"good{i}.png")
    (folder / "notes.jpg").write_text("this is a text file with an image's name\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / ".hidden.png").write_text("hidden files are skipped\n")
    plot = tmp_path / "out.png"

    proc = eval_done.run("predict", str(folder), "--model", CHAMPION, "--top-k", "3", "--plot", str(plot),
                         check=False)

    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["file", "class", "probability", "top2", "top3"]
    table = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(table) == {str(folder / f"good{i}.png") for i in range(3)}
    for i, r in enumerate(rows):
        cells = table[str(folder / f"good{i}.png")]
        assert cells[1] == r["predicted"]
        assert float(cells[2]) == pytest.approx(float(r["probability"]), abs=2e-4)
        # top2/top3: "<class> <probability>", each below the top class and in decreasing order
        second, third = (cells[3], float(cells[4])), (cells[5], float(cells[6]))
        assert len({cells[1], second[0], third[0]}) == 3
        assert float(cells[2]) >= second[1] >= third[1]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert sorted(errors) == sorted([f"error: {folder / 'empty.png'}: empty file (0 bytes)",
                                     f"error: {folder / 'notes.jpg'}: a text file, not an image"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_top_k_on_one_image_shows_the_extra_columns(eval_done, capsys):
    row = confident(eval_done, 1)[0]
    image = eval_done.path("data/raw") / row["file"]
    with inside_project(eval_done):
        code = predict.main([str(image), "--top-k", "3"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert out[0].split() == ["file", "class", "probability", "top2", "top3"]
    cells = out[1].split()
    assert cells[:2] == [str(image), row["predicted"]]


def test_predict_unknown_model_and_empty_folder_fail_clearly(eval_done, tmp_path, capsys):
    with inside_project(eval_done):
        assert predict.main([str(tmp_path), "--model", "no/such/model.pt"]) == 2
        assert "no such file" in capsys.readouterr().err
        assert predict.main([str(tmp_path)]) == 2
        assert "no files found" in capsys.readouterr().err


def test_predict_folders_given_with_dotdot_or_under_a_hidden_parent(eval_done, tmp_path, capsys):
    """Only the parts below a given folder can hide a file: `../x/imgs` and `.cache/imgs` work, while
    hidden entries inside them are still skipped. (Both said "no files found", exit 2.)"""
    row = confident(eval_done, 1)[0]
    folder = tmp_path / ".cache" / "imgs"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    shutil.copy(eval_done.path("data/raw") / row["file"], folder / "a.png")
    (folder / ".ipynb_checkpoints" / "junk.png").write_text("hidden: skipped")
    with inside_project(eval_done):
        for given in (str(folder), os.path.relpath(folder, eval_done.root)):
            assert predict.main([given]) == 0, capsys.readouterr().err
            assert capsys.readouterr().out.startswith(f"{Path(given) / 'a.png'}: {row['predicted']} (")


def test_predict_arguments_fail_clearly_or_work(eval_done, tmp_path, capsys):
    """--top-k 0 is refused by name; --plot into a folder that does not exist yet creates it (was a
    traceback)."""
    image = str(eval_done.path("data/raw") / confident(eval_done, 1)[0]["file"])
    plot = tmp_path / "new" / "folder" / "out.png"
    with inside_project(eval_done):
        with pytest.raises(SystemExit) as refused:
            predict.main([image, "--top-k", "0"])
        assert refused.value.code == 2 and "--top-k: 0 is not >= 1" in capsys.readouterr().err
        assert predict.main([image, "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pyfunc_champion_predicts_probabilities(eval_done):
    import mlflow

    test = np.load(eval_done.path("data/prepared/test.npy"))[:16]
    batch = test.astype(np.float32) / 255.0
    with inside_project(eval_done):
        model = mlflow.pyfunc.load_model(CHAMPION)
        probs = np.asarray(model.predict(batch))
    classes = json.loads(eval_done.path("data/prepared/classes.json").read_text())
    assert probs.shape == (16, len(classes)) == (16, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    expected = evaluate_predictions(eval_done)[:16]
    assert [classes[i] for i in probs.argmax(axis=1)] == [r["predicted"] for r in expected]
    np.testing.assert_allclose(probs.max(axis=1), [float(r["probability"]) for r in expected], atol=2e-6)

    inputs = model.metadata.get_input_schema().inputs
    assert len(inputs) == 1 and inputs[0].shape == (-1, *batch.shape[1:]) == (-1, 1, 8, 8)
    assert inputs[0].type == np.dtype("float32")
    assert model.metadata.get_output_schema().inputs[0].shape == (-1, 10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_invocations(eval_done):
    """`mlflow models serve` of @champion (local env), a JSON batch POSTed to /invocations."""
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    if not mlflow_cli.exists():
        pytest.skip("no mlflow CLI beside this interpreter")
    port = free_port()
    env = eval_done.env()
    env["PATH"] = f"{mlflow_cli.parent}{os.pathsep}{env.get('PATH', '')}"
    log = eval_done.root.parent / f"serve-{port}.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", CHAMPION, "--env-manager", "local",
                                   "-h", "127.0.0.1", "-p", str(port)], cwd=eval_done.root, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except (urllib.error.URLError, OSError):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"server not up (exit {server.poll()}):\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        test = np.load(eval_done.path("data/prepared/test.npy"))[:4].astype(np.float32) / 255.0
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": test.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            probs = np.array(json.loads(resp.read())["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: a group this test started
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert probs.shape == (4, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    expected = evaluate_predictions(eval_done)[:4]
    classes = json.loads(eval_done.path("data/prepared/classes.json").read_text())
    assert [classes[i] for i in probs.argmax(axis=1)] == [r["predicted"] for r in expected]
    np.testing.assert_allclose(probs.max(axis=1), [float(r["probability"]) for r in expected], atol=2e-6)
