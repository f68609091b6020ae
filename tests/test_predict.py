"""predict (CLI), the registered model's pyfunc flavour and `mlflow models serve`, all checked against
what evaluate predicted for the same test images."""

from __future__ import annotations

import base64
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
import pandas as pd
import pytest
from helpers.predictions import b64, confident, copy_images, evaluate_predictions
from helpers.project import inside_project

from pipeline import predict

NAME = "image-classifier"
CHAMPION = f"models:/{NAME}@champion"


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
    folder = copy_images(eval_done, rows, tmp_path / "mixed", "good{i}.png")
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


def test_pyfunc_champion_answers_images_with_class_names(eval_done):
    """The registered model's pyfunc: image files (base64) and float pixels in, class names out; a bad
    row is answered with its error and the others all the same."""
    import mlflow

    expected = evaluate_predictions(eval_done)[:6]
    test = np.load(eval_done.path("data/prepared/test.npy"))[:6].astype(np.float64) / 255.0
    rows = [{"image": b64(eval_done.path(f"data/raw/{r['file']}"))} for r in expected[:3]]
    rows += [{"pixels": test[i].tolist()} for i in range(3, 6)]
    rows += [{"image": base64.b64encode(b"<html>not an image</html>").decode()},
             {"pixels": (test[0] * 255).round().tolist()},  # 0..255, not 0..1
             {"pixels": test[0][:, :4].tolist()},  # another size
             {"image": "%%%"}]
    with inside_project(eval_done):
        model = mlflow.pyfunc.load_model(CHAMPION)
        answer = model.predict(pd.DataFrame(rows), params={"top_k": 3})
        example = json.loads(Path(mlflow.artifacts.download_artifacts(
            f"{CHAMPION}/input_example.json", dst_path=str(eval_done.root.parent / "ex"))).read_text())
    assert list(answer.columns) == ["class", "probability", "top_classes", "top_probabilities", "error"]
    for i, r in enumerate(expected):  # what evaluate predicted for the same test images
        assert answer["class"][i] == r["predicted"] and pd.isna(answer["error"][i])
        assert answer["probability"][i] == pytest.approx(float(r["probability"]), abs=2e-6)
        assert len(answer["top_classes"][i]) == 3 and answer["top_classes"][i][0] == r["predicted"]
        assert list(answer["top_probabilities"][i]) == sorted(answer["top_probabilities"][i], reverse=True)
    errors = list(answer["error"][6:])
    assert "an HTML page, not an image" in errors[0]
    assert "must be floats in 0..1" in errors[1] and "got 0..255" in errors[1]
    assert "shape (1, 4, 8)" in errors[2] and "(1, 8, 8)" in errors[2]
    assert "not base64" in errors[3]
    assert all(pd.isna(c) for c in answer["class"][6:])

    inputs = {c.name: c for c in model.metadata.get_input_schema().inputs}
    assert set(inputs) == {"image", "pixels"} and not inputs["image"].required
    assert {c.name for c in model.metadata.get_output_schema().inputs} >= {"class", "probability", "error"}
    assert example["columns"] == ["image"] and base64.b64decode(example["data"][0][0])[:8] == b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_invocations(eval_done):
    """`mlflow models serve` of @champion (local env): image files, base64, POSTed to /invocations."""
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
        expected = evaluate_predictions(eval_done)[:4]
        rows = [{"image": b64(eval_done.path(f"data/raw/{r['file']}"))} for r in expected]
        rows.append({"image": base64.b64encode(b"shopping list").decode()})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"dataframe_records": rows}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            answers = json.loads(resp.read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: a group this test started
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert [a["class"] for a in answers[:4]] == [r["predicted"] for r in expected]  # class names, labelled
    assert [a["probability"] for a in answers[:4]] == pytest.approx([float(r["probability"]) for r in expected],
                                                                    abs=2e-6)
    assert answers[0]["error"] is None  # JSON null, not NaN (which strict JSON parsers refuse)
    assert answers[4]["class"] is None and "a text file, not an image" in answers[4]["error"]


def test_predict_folder_to_csv_in_batches_with_error_rows(eval_done, tmp_path, monkeypatch):
    """--output: one CSV row per file in order, the bad ones with their error; batches smaller than the
    folder so that the batching is crossed."""
    monkeypatch.setattr(predict, "BATCH", 2)
    rows = confident(eval_done, 3)
    folder = copy_images(eval_done, rows, tmp_path / "batch", "{i}-good.png")
    (folder / "1a-bad.png").write_text("not an image\n")
    out = tmp_path / "preds.csv"
    with inside_project(eval_done):
        code = predict.main([str(folder), "--output", str(out), "--top-k", "2"])
    assert code == 1  # a file was not an image; the others are all there
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["file", "class", "probability", "top2", "error"]
    assert [Path(f).name for f in table["file"]] == ["0-good.png", "1-good.png", "1a-bad.png", "2-good.png"]
    good = table[table["error"] == ""]
    assert list(good["class"]) == [r["predicted"] for r in rows]
    assert list(good["probability"].astype(float)) == pytest.approx([float(r["probability"]) for r in rows], abs=2e-4)
    bad = table[table["file"].str.endswith("1a-bad.png")].iloc[0]
    assert bad["class"] == "" and "a text file, not an image" in bad["error"]


def test_logged_onnx_model_predicts_like_pytorch(eval_done, tmp_path, capsys):
    """The ONNX file logged beside @champion: `predict --model model.onnx` gives evaluate's answers."""
    import mlflow

    with inside_project(eval_done):
        folder = Path(mlflow.artifacts.download_artifacts(f"{CHAMPION}/artifacts", dst_path=str(tmp_path / "m")))
        onnx_file = folder / "model.onnx"
        rows = confident(eval_done, 3)
        images = [str(eval_done.path("data/raw") / r["file"]) for r in rows]
        assert predict.main([*images, "--model", str(onnx_file)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    for line, r in zip(lines, rows):
        cells = line.split()
        assert cells[1] == r["predicted"] and float(cells[2]) == pytest.approx(float(r["probability"]), abs=2e-4)
