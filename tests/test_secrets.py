"""Credentials in a URL source are used for the download and redacted wherever the pipeline records the
source: data/raw.json, the prepared data's meta.json, MLflow params, tags, run name and dataset, logs."""

from __future__ import annotations

import base64
import json

from helpers.archives import files_of, write_zip
from helpers.images import image_tree
from pipeline.urls import redact

SECRETS = ("s3cr3t-pw", "tok-9f8e7d", "sig-1a2b3c")


def test_redact_keeps_the_url_and_hides_credentials():
    assert redact("https://user:pw@host:8443/a/b.zip?token=t&x=1#frag") == \
        "https://user:***@host:8443/a/b.zip?token=***&x=***#frag"
    assert redact("https://token@host/b.zip") == "https://***@host/b.zip"
    for plain in ("https://host/b.zip", "data/sources/x.zip", "builtin:digits", "torchvision:MNIST",
                  "sqlite:////tmp/mlflow.db"):
        assert redact(plain) == plain


def test_a_source_with_credentials_downloads_and_records_them_redacted(project, http_server, tmp_path):
    archive = write_zip(tmp_path / "images.zip", files_of(image_tree(tmp_path / "src")))
    path = http_server.serve(f"/images.zip?token={SECRETS[1]}&signature={SECRETS[2]}", archive.read_bytes())
    url = path.replace("http://", f"http://alice:{SECRETS[0]}@")
    project.set(data__source=url, prepare__image_size=8, prepare__min_images_per_class=3,
                train__epochs=1, train__hidden_units=4)
    out = "".join(project.run(stage).stderr for stage in ("fetch_data", "prepare", "train"))

    # the download used them: the token in the query, the password as basic auth
    assert http_server.requests == [f"/images.zip?token={SECRETS[1]}&signature={SECRETS[2]}"]
    assert http_server.authorizations == ["Basic " + base64.b64encode(f"alice:{SECRETS[0]}".encode()).decode()]
    raw = json.loads(project.path("data/raw.json").read_text())
    assert raw["source"] == redact(url) and "alice:***@" in raw["source"] and "token=***" in raw["source"]
    meta = json.loads(project.path("data/prepared/meta.json").read_text())
    run = project.runs()[0]
    recorded = [out, json.dumps(raw), json.dumps(meta), json.dumps(run.data.params), json.dumps(run.data.tags),
                run.info.run_name, json.dumps([d.dataset.name for d in run.inputs.dataset_inputs])]
    for text in recorded:
        assert not any(secret in text for secret in SECRETS), text[:500]
    assert run.data.params["data.source"] == redact(url)
