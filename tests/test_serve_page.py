"""The Gradio page: through gradio's own client (every run), and in headless Chromium (skipped without it):
the student's images equal the API's for the same seed, the teacher's DDIM images sit beside them from the
same x_T, errors reach the page as one line; the browser types a prompt, clicks Generate and finds the images.

Chromium and its driver: ``apt-get install -y chromium chromium-driver``. A screenshot of the page goes to
the path in ``LOOPFREE_SCREENSHOT`` if set (docs/serve.png is made that way, see docs/serve.md).
"""

import base64
import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from loopfree.serve.app import create_app
from loopfree.serve.batcher import Batcher
from loopfree.toy.world import heldout_prompts
from serving import running, toy_engine

PROMPT = "a large green circle in the right of a gray image"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
EXAMPLES = heldout_prompts(4)


@pytest.fixture(scope="module")
def server():
    engine = toy_engine()
    with running(create_app(engine, Batcher(engine.render, max_batch=8, max_queue=64), EXAMPLES)) as url:
        yield url


def pixels(image: bytes | str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image) if isinstance(image, bytes) else image).convert("RGB"))


def api_images(url: str, **body) -> list[np.ndarray]:
    reply = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60).json()
    return [pixels(base64.b64decode(d["b64_json"])) for d in reply["data"]]


def test_the_page_shows_the_students_images_beside_the_teachers(server):
    client = Client(f"{server}/", verbose=False)
    gallery, timing = client.predict(PROMPT, 3, 2, "loop_free", 4, 1.0, True, api_name="/generate")
    images = gallery["value"]
    assert gallery["columns"] == 3 and len(images) == 6
    labels = [item["caption"].split(":")[0] for item in images]
    assert labels == ["student K=4", "teacher DDIM 4", "teacher DDIM 50"] * 2
    assert all(item["caption"].endswith(" ms") for item in images)
    assert "seed **3**" in timing and "teacher DDIM 50:" in timing
    shown = [pixels(item["image"]) for item in images]
    for column, body in enumerate([dict(), dict(model="teacher", steps=4), dict(model="teacher", steps=50)]):
        assert all(np.array_equal(a, b) for a, b in zip(shown[column::3], api_images(server, prompt=PROMPT, n=2, seed=3, **body)))


def test_the_page_changes_the_default_steps_with_the_mode_and_shows_errors(server):
    client = Client(f"{server}/", verbose=False)
    assert client.predict("loop", api_name="/default_steps") == 50
    assert client.predict("loop_free", api_name="/default_steps") == 4
    with pytest.raises(AppError, match="prompt is empty"):
        client.predict("  ", 0, 1, "loop_free", 4, 1.0, False, api_name="/generate")


@pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                    reason=f"needs Chromium and its driver ({CHROMIUM}, {CHROMEDRIVER}): "
                           "apt-get install -y chromium chromium-driver")
def test_in_chromium_a_typed_prompt_gives_images(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--window-size=1280,960",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"{server}/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea")).send_keys(PROMPT)
        driver.find_element(By.CSS_SELECTOR, "#compare input").click()
        driver.find_element(By.CSS_SELECTOR, "#generate").click()

        def loaded_images(d):
            images = d.find_elements(By.CSS_SELECTOR, "#gallery img")
            done = [i for i in images if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)]
            return done if len(done) == 12 else False  # 4 images, each beside the teacher's two

        images = wait.until(loaded_images)
        assert all(d == 64 for i in images for d in (i.get_property("naturalWidth"), i.get_property("naturalHeight")))
        text = driver.find_element(By.CSS_SELECTOR, "#gallery").text
        assert text.count("student K=4:") == 4 and text.count("teacher DDIM 50:") == 4
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()
    if os.environ.get("LOOPFREE_SCREENSHOT"):
        shot = Image.open(tmp_path / "page.png").convert("RGB").quantize(256)  # a palette PNG: well under 300 kB
        shot.save(tmp_path / "small.png", optimize=True)
        shutil.copyfile(tmp_path / "small.png", os.environ["LOOPFREE_SCREENSHOT"])
