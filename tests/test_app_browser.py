"""The feature explorer (space/app.py) in a real headless Chromium: the page loads the shipped linear classifier,
takes an uploaded image, redraws the PCA maps when a layer is added, shows the prediction, the nearest training
images, a clicked point's correspondence and the probe heatmaps, and a folder that is not a model gives a message.

Skipped without gradio, playwright or a system Chromium (``apt-get install -y chromium``), unless
``DDAE_REQUIRE_BROWSER=1`` (as in .ci/run): then their absence fails. With
``DDAE_SCREENSHOTS=docs/images`` it also saves a screenshot of each view there.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

REQUIRED = os.environ.get("DDAE_REQUIRE_BROWSER", "") not in ("", "0")  # CI (.ci/run): fail instead of skipping
try:
    import gradio  # noqa: F401
    from playwright import sync_api as playwright_api
except ImportError as error:
    if REQUIRED:
        raise
    pytest.skip(f"the browser test needs gradio and playwright: pip install -e '.[app]' ({error})",
                allow_module_level=True)  # fmt: skip
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if REQUIRED:
        raise RuntimeError("no system Chromium: apt-get install -y chromium")
    pytest.skip("no system Chromium: apt-get install -y chromium", allow_module_level=True)

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]  # fmt: skip
CLASSIFIER = "examples/ddae-cifar10-cpu-linear"  # the app runs in the repository root
CLASSES = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
TIMEOUT_MS = 90_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "space" / "app.py"), "--model", CLASSIFIER, "--port", str(port),
             "--bank_size", "48"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the app did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def page(app_url):
    with playwright_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(app_url)
        page.wait_for_selector("#status >> text=Loaded", timeout=TIMEOUT_MS)
        yield page
        browser.close()


def screenshot(page, name: str) -> None:
    """Saves the page as ``$DDAE_SCREENSHOTS/name`` (256 colours, small enough to commit) when that is set."""
    folder = os.environ.get("DDAE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(Path(folder) / name, optimize=True)


def image_source(page, selector: str) -> str | None:
    element = page.query_selector(f"{selector} img")
    return None if element is None else element.get_attribute("src")


TOAST = ".toast-body, [data-testid=toast-body]"


def wait_for_new_image(page, selector: str, old: str | None) -> str:
    """Waits until ``selector`` shows a loaded image other than ``old`` (fails at once on an error message)."""
    page.wait_for_function(
        "([selector, old, toast]) => { if (document.querySelector(toast)) return true;"
        " const img = document.querySelector(selector + ' img');"
        " return img && img.complete && img.naturalWidth > 0 && img.getAttribute('src') !== old; }",
        arg=[selector, old, TOAST], timeout=TIMEOUT_MS,
    )  # fmt: skip
    toast = page.query_selector(TOAST)
    assert toast is None, f"the page shows an error: {toast.inner_text()}"
    return image_source(page, selector)


def test_upload_layers_maps_and_prediction(page, tmp_path):
    first = wait_for_new_image(page, "#maps", None)
    assert page.locator("#status").inner_text().startswith("Loaded")
    # upload an image of another kind than the samples: a 50x40 greyscale PNG, converted by the page
    upload = tmp_path / "stripes.png"
    Image.fromarray(((np.indices((40, 50))[1] // 5 % 2) * 255).astype("uint8"), "L").save(upload)
    page.set_input_files("#image input[type=file]", str(upload))
    after_upload = wait_for_new_image(page, "#maps", first)
    # the prediction of the classifier for the uploaded image: five classes with their probabilities
    page.wait_for_selector("#prediction >> text=%")
    shown_classes = {word for word in page.locator("#prediction").inner_text().split() if word in CLASSES}
    assert len(shown_classes) >= 3
    # add a layer: the maps are drawn again, one more column per level
    before = page.eval_on_selector("#maps img", "img => img.naturalWidth")
    page.click("#layers input")
    page.keyboard.type("down_blocks.2.resnets.0")
    page.keyboard.press("Enter")
    wait_for_new_image(page, "#maps", after_upload)
    assert "down_blocks.2.resnets.0" in page.locator("#layers").inner_text()
    assert page.eval_on_selector("#maps img", "img => img.naturalWidth") > before
    page.click(".gallery-item >> nth=2")  # back to a sample (a horse) for the screenshot
    wait_for_new_image(page, "#maps", image_source(page, "#maps"))
    page.wait_for_selector("#prediction >> text=%")
    screenshot(page, "app-pca-maps.png")


def test_neighbours_correspondence_and_probe_views(page):
    page.click("button[role=tab]:has-text('Nearest training images')")
    page.click("#find")
    wait_for_new_image(page, "#neighbours", None)
    screenshot(page, "app-neighbours.png")

    page.click("button[role=tab]:has-text('Correspondence')")
    page.wait_for_function("() => { const i = document.querySelector('#click img'); return i && i.naturalWidth; }")
    page.click("#click img", position={"x": 120, "y": 100})
    wait_for_new_image(page, "#matches", None)
    screenshot(page, "app-correspondence.png")

    page.click("button[role=tab]:has-text('Probe heatmap')")
    page.click("#show_probe")
    page.wait_for_selector("#heatmaps img")
    page.wait_for_selector("text=best cell")
    screenshot(page, "app-probe-heatmap.png")


def test_a_folder_that_is_not_a_model_gives_a_message(page, tmp_path):
    page.fill("#model textarea, #model input", str(tmp_path))
    page.click("#load")
    message = page.wait_for_selector(TOAST, timeout=TIMEOUT_MS)
    text = message.inner_text()
    assert str(tmp_path) in text and "Traceback" not in text
