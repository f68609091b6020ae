"""`make demo` in a real headless Chromium: the app on @champion, an image uploaded through the page's
file input and one picked from the test split, each answered with the class predict gives."""

from __future__ import annotations

import json
import sys
import urllib.request

from helpers.browser import browser_or_skip
from helpers.mlflow_server import free_port
from helpers.predictions import confident
from helpers.processes import Background, poll


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


def test_demo_classifies_an_uploaded_image_and_a_test_example(eval_done, tmp_path):
    browser_or_skip()
    from tools.browser import browser, offline

    row = confident(eval_done, 1)[0]
    image = eval_done.path("data/raw") / row["file"]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    demo = Background([sys.executable, "-m", "pipeline.demo", "--port", str(port)], eval_done.root, eval_done.env(),
                      tmp_path / "demo.log")
    try:
        poll(lambda: answers(url), "the demo's page", timeout=120, bg=demo, interval=0.3)
        with browser() as b:
            ctx = b.new_context(viewport={"width": 1000, "height": 800})
            offline(ctx)  # the page needs nothing from the internet
            page = ctx.new_page()
            page.goto(url, wait_until="load")
            assert "image-classifier@champion" in page.locator("#model").inner_text()
            assert float(page.locator("#accuracy").inner_text()) > 0.5
            page.set_input_files("#file", str(image))
            page.wait_for_function("document.getElementById('prediction').textContent !== '-'", timeout=30_000)
            assert page.locator("#prediction").inner_text() == row["predicted"]
            bars = page.locator("#bars .bar")
            classes = json.loads(eval_done.path("data/prepared/meta.json").read_text())["classes"]
            assert bars.count() == min(5, len(classes)) and bars.first.locator(".name").inner_text() == row["predicted"]
            assert "ms" in page.locator("#time").inner_text()
            page.screenshot(path=str(tmp_path / "demo.png"))

            example = page.locator("#examples img").nth(1)
            truth = example.get_attribute("title").split(" ")[0]
            page.evaluate("document.getElementById('prediction').textContent = '-'")
            example.click()
            page.wait_for_function("document.getElementById('prediction').textContent !== '-'", timeout=30_000)
            predicted = page.locator("#prediction").inner_text()
            assert predicted in {c.strip() for c in page.locator("#bars .name").all_inner_texts()}
            print(f"example of class {truth}: predicted {predicted}")
            ctx.close()
    finally:
        demo.kill()
