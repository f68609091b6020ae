"""`make demo`: a small web app on a model: upload an image (or pick one of the test split's), see the
top classes as bars, how long the prediction took, and which model is serving.

    python -m pipeline.demo [--model models:/<name>@champion | models/model.pt | runs:/...]
                            [--host 127.0.0.1] [--port 7860]

A FastAPI app (MLflow's own server stack) served by uvicorn; images go through the served model's
code (serving.predict_frame), so the demo answers exactly as `mlflow models serve` does.
"""

from __future__ import annotations

import argparse
import base64
import html
import logging
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from pipeline import registry, serving, tracking
from pipeline.config import PARAMS_FILE, load_params
from pipeline.dataset import load_meta, load_split
from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.models import Classifier
from pipeline.paths import METRICS_JSON, PREPARED_DIR
from pipeline.predict import load_any

log = logging.getLogger(__name__)

EXAMPLES = 8  # test images offered, one class after another


@dataclass(frozen=True)
class Serving:
    """What the page says about the model it runs."""

    model: Classifier
    name: str  # the URI or file it came from, with the version an alias resolved to
    test_accuracy: float | None


def describe(ref: str, params) -> Serving:
    if ref.startswith(("models:/", "runs:/")):
        tracking.configure(params.mlflow.experiment)
        model, source = registry.load_model_with_source(ref)
        accuracy = None
        if source.startswith("models:/") and source.count("/") == 2:  # models:/<name>/<version>
            name, version = source.removeprefix("models:/").split("/")
            score = registry.version_tags(name, version).get("test_accuracy")
            accuracy = float(score) if score else None
        return Serving(model, f"{ref} (= {source})" if source != ref else ref, accuracy)
    model = load_any(ref)
    accuracy = read_json(METRICS_JSON)["accuracy"] if METRICS_JSON.exists() else None
    return Serving(model, ref, accuracy)


def examples(model: Classifier, count: int = EXAMPLES) -> list[dict]:
    """Test images, one class after another, as PNG data URLs with their true class."""
    if not (PREPARED_DIR / "meta.json").exists():
        return []
    meta = load_meta()
    if tuple(meta.classes) != tuple(model.classes):
        return []  # another data set than the model's: its test images would mislead
    test = load_split("test", meta=meta)
    picks: list[int] = []
    for offset in range(len(test.labels)):
        for cls in range(len(meta.classes)):
            hits = np.flatnonzero(test.labels == cls)
            if offset < len(hits) and len(picks) < count:
                picks.append(int(hits[offset]))
        if len(picks) >= count:
            break
    out = []
    for i in picks:
        out.append({"label": meta.classes[test.labels[i]], "file": test.files[i],
                    "data": "data:image/png;base64," + serving.png_base64(np.asarray(test.images[i]))})
    return out


def app(serving_: Serving) -> FastAPI:
    api = FastAPI(title="image classifier demo")
    page = PAGE.replace("{model}", html.escape(serving_.name)).replace(
        "{accuracy}", "n/a" if serving_.test_accuracy is None else f"{serving_.test_accuracy:.4f}").replace(
        "{classes}", str(len(serving_.model.classes)))
    shown = examples(serving_.model)

    @api.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @api.get("/examples")
    def list_examples() -> list[dict]:
        return shown

    @api.post("/predict")
    async def predict(request: Request):
        data = await request.body()
        began = time.perf_counter()
        answer = serving.predict_frame(serving_.model, pd.DataFrame({"image": [base64.b64encode(data).decode()]}),
                                       top_k=5).iloc[0]
        took = (time.perf_counter() - began) * 1000
        if answer["error"]:
            return JSONResponse({"error": answer["error"]}, status_code=400)
        return {"class": answer["class"], "probability": answer["probability"],
                "top": [{"class": c, "probability": p}
                        for c, p in zip(answer["top_classes"], answer["top_probabilities"])],
                "milliseconds": round(took, 1)}

    return api


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Image classifier</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 52rem; color: #222; }
.model { color: #555; font-size: 0.9rem; } .row { display: flex; gap: 2rem; align-items: flex-start; }
#preview { width: 12rem; height: 12rem; object-fit: contain; border: 1px solid #ccc; image-rendering: pixelated; }
.bar { display: flex; align-items: center; gap: .5rem; margin: .3rem 0; }
.bar span.name { width: 9rem; text-align: right; } .bar div { background: #3b7dd8; height: 1.1rem; }
#examples img { width: 4rem; height: 4rem; margin: .2rem; cursor: pointer; border: 1px solid #ccc;
  image-rendering: pixelated; }
#error { color: #b00; }
</style></head>
<body>
<h1>Image classifier</h1>
<p class="model">Serving <b id="model">{model}</b> &middot; test accuracy <b id="accuracy">{accuracy}</b>
 &middot; {classes} classes</p>
<div class="row">
  <div>
    <input type="file" id="file" accept="image/*"><br><br>
    <img id="preview" alt="">
  </div>
  <div>
    <h2>Prediction: <span id="prediction">-</span></h2>
    <div id="bars"></div>
    <p id="time"></p><p id="error"></p>
  </div>
</div>
<h3>Or pick one of the test images</h3>
<div id="examples"></div>
<script>
async function classify(blob) {
  document.getElementById('error').textContent = '';
  const r = await fetch('/predict', {method: 'POST', body: blob});
  const answer = await r.json();
  if (!r.ok) { document.getElementById('error').textContent = answer.error || JSON.stringify(answer); return; }
  document.getElementById('prediction').textContent = answer.class;
  document.getElementById('time').textContent = 'predicted in ' + answer.milliseconds + ' ms';
  const bars = document.getElementById('bars'); bars.innerHTML = '';
  for (const t of answer.top) {
    const row = document.createElement('div'); row.className = 'bar';
    row.innerHTML = '<span class="name"></span><div></div><span></span>';
    row.children[0].textContent = t.class;
    row.children[1].style.width = Math.max(1, Math.round(t.probability * 300)) + 'px';
    row.children[2].textContent = (100 * t.probability).toFixed(1) + ' %';
    bars.appendChild(row);
  }
}
document.getElementById('file').addEventListener('change', e => {
  const f = e.target.files[0]; if (!f) return;
  document.getElementById('preview').src = URL.createObjectURL(f); classify(f);
});
fetch('/examples').then(r => r.json()).then(list => {
  for (const ex of list) {
    const img = document.createElement('img'); img.src = ex.data; img.title = ex.label + ' (' + ex.file + ')';
    img.addEventListener('click', async () => {
      document.getElementById('preview').src = ex.data; classify(await (await fetch(ex.data)).blob());
    });
    document.getElementById('examples').appendChild(img);
  }
});
</script>
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="default: models:/<mlflow.registered_model>@champion")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a page of bars in the log otherwise
    try:
        params = load_params(PARAMS_FILE)
        served = describe(args.model or f"models:/{params.mlflow.registered_model}@champion", params)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    print(f"demo of {served.name} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app(served), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
