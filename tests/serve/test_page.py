"""The chat page in a real headless Chromium: load it, send a message, see the reply stream in
and the expert-cache heatmap change; keep a screenshot.

Chromium and its driver come from Debian's packages (`apt-get install chromium
chromium-driver`); the test installs them when it can (root, apt-get), skips saying why
when it cannot, and fails instead under CI=true. EDGEMOE_SCREENSHOT=PATH also writes the
screenshot there (docs/serve-page.png is made so).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from edgemoe.serve.loadgen import ServerProcess

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def server():
    """The demo in a budget, a third of its experts cached: the gauge and the heatmap show it."""
    args = ["--mem", "640MiB", "--max-batch", "4", "--ctx", "1024", "--expert-cache", "33%"]
    with ServerProcess(args) as s:
        yield s


def _paths():
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    return browser, shutil.which("chromedriver")


def _install() -> str:
    """Try Debian's packages; the reason it could not, or ''."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root, or no apt-get, so Debian's chromium cannot be installed"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    for step in (cmd, ["apt-get", "update", "-q"], cmd):
        p = subprocess.run(step, capture_output=True, text=True, timeout=900, env=env)
        if step is cmd and p.returncode == 0:
            return ""
    return f"apt-get install chromium chromium-driver failed: {p.stderr.strip()[-300:]}"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = _paths()
    why = "" if chromium and driver else _install()
    chromium, driver = _paths()
    if not (chromium and driver):
        msg = f"no Chromium for the page test: {why or 'chromium or chromedriver not found'}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,860",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(arg)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download anything
    d = webdriver.Chrome(service=Service(driver), options=opts)
    yield d
    d.quit()


def test_chat_on_the_page_moves_the_heatmap(browser, server, tmp_path):
    d = browser
    wait = WebDriverWait(d, 120)
    d.get(server.url + "/")
    heatmap = d.find_element(By.ID, "heatmap")
    wait.until(lambda _: heatmap.get_attribute("data-step"))
    assert d.find_element(By.ID, "state").text == "serving"
    before = heatmap.get_attribute("data-signature")
    parts = d.find_elements(By.CSS_SELECTOR, "#gauge div[data-part]")
    assert [p.get_attribute("data-part") for p in parts] == [
        "floor",
        "resident",
        "kv_cache",
        "io_buffers",
        "workspace",
        "expert_cache",
    ]

    def say(text: str, n: int):
        d.find_element(By.ID, "input").send_keys(text)
        d.find_element(By.ID, "send").click()
        done = ".msg.assistant[data-done=true]"
        wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, done)) == n)
        reply = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[n - 1]
        assert "error" not in reply.get_attribute("class"), reply.text
        return reply.text

    first = say("Tell me about the kingdom", 1)
    assert len(first.split()) > 3 and "tokens" in first  # the reply, then its figures
    wait.until(lambda _: heatmap.get_attribute("data-signature") != before)
    assert int(heatmap.get_attribute("data-cached")) > 0
    second = say("And what then?", 2)
    assert "reused from the last turn" in second  # the conversation's KV was kept
    time.sleep(1.2)  # one more panel refresh after the reply
    for path in filter(None, (tmp_path / "serve-page.png", os.environ.get("EDGEMOE_SCREENSHOT"))):
        assert d.save_screenshot(str(path))
