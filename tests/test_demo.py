"""The web demo for real: `captioner-demo` serves on 127.0.0.1, headless Chromium (Debian's chromium +
chromium-driver, driven by Selenium) uploads images and reads the captions back; bad uploads get a message and the
server keeps serving. Skipped, saying why, where Chromium, its driver, Gradio or Selenium is not installed."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, hostile_files

pytestmark = pytest.mark.e2e

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
# The README's screenshot: CAPTIONER_DEMO_SCREENSHOT=docs/demo.png, with CAPTIONER_DEMO_CKPT a fully trained run's
# checkpoint instead of the tiny one
SCREENSHOT = os.environ.get("CAPTIONER_DEMO_SCREENSHOT")


def _missing() -> str | None:
    if not CHROMIUM or not DRIVER:
        return "no Chromium/chromedriver (apt-get install -y chromium chromium-driver)"
    for module in ("gradio", "selenium"):
        try:
            __import__(module)
        except ImportError:
            return f"no {module} (pip install -e '.[demo,dev]')"
    return None


if _missing():
    pytest.skip(_missing(), allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_attention_run):
    """`captioner-demo CKPT` on a free local port: (url, process, run dir, checkpoint)."""
    root, run_dir = tiny_attention_run
    if os.environ.get("CAPTIONER_DEMO_CKPT"):
        ckpt = os.environ["CAPTIONER_DEMO_CKPT"]
        run_dir = Path(ckpt).resolve().parent.parent
    ckpt = ckpt if os.environ.get("CAPTIONER_DEMO_CKPT") else \
        json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"]
    port = _free_port()
    env = dict(os.environ, CAPTIONER_ROOT=str(root), GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "-m", "captioner.demo", ckpt, "--port", str(port), "--device", "cpu"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"captioner-demo exited ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("captioner-demo did not serve within 180 s")
    yield url, proc, run_dir, ckpt
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _caption_in_browser(driver, url: str, image: Path, timeout: float = 120) -> str:
    """Open the page, upload `image`, press Caption, and wait for the caption box to change."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]"))
    upload.send_keys(str(image))
    wait.until(lambda d: image.stem in d.find_element(By.ID, "upload").text)  # the file is uploaded
    box = driver.find_element(By.CSS_SELECTOR, "#caption textarea")
    before = box.get_attribute("value")
    driver.find_element(By.ID, "caption-button").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#caption textarea").get_attribute("value") not in
               (before, ""))
    return driver.find_element(By.CSS_SELECTOR, "#caption textarea").get_attribute("value")


def test_upload_an_image_and_read_its_caption(server, browser, tmp_path):
    from captioner import Captioner

    url, proc, run_dir, ckpt = server
    image = Path(json.loads((run_dir / "predictions.jsonl").read_text().splitlines()[0])["image_path"])
    shown = _caption_in_browser(browser, url, image)
    assert shown == Captioner.from_pretrained(ckpt, device="cpu").caption(image)  # the API's caption, greedy
    assert "test images of the run" in browser.page_source  # the examples gallery
    if SCREENSHOT:
        time.sleep(5)  # the attention gallery's images load after the caption
        browser.save_screenshot(SCREENSHOT)
    assert browser.save_screenshot(str(tmp_path / "demo.png")) and (tmp_path / "demo.png").stat().st_size > 10_000


def test_bad_uploads_get_a_message_and_the_server_keeps_serving(server, browser, tmp_path):
    url, proc, run_dir, _ = server
    text, good, truncated, huge = hostile_files(tmp_path)
    for bad, words in ((text, "not a readable image"), (truncated, "not a readable image"),
                       (huge, "pixel limit")):
        shown = _caption_in_browser(browser, url, bad)
        assert shown.startswith(f"error: {bad.name}") and words in shown, shown
        assert proc.poll() is None  # still serving
    assert not _caption_in_browser(browser, url, good).startswith("error")
