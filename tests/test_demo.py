"""`tinylm demo`: the Gradio page in a real headless Chromium, and the message when Gradio is missing.

The browser test needs Debian's `chromium` and `chromium-driver` (apt) and the
`selenium` and `gradio` Python packages; it is skipped only where no browser is
installed. Selenium is pointed at the system chromedriver, so nothing downloads
a browser or a driver.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from helpers_checkpoint import tiny_checkpoint
from training_helpers import ONE_THREAD

from tinylm import demo, generate, sampler

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PROMPT = "the quick "
NEW_TOKENS = 2000
SERVER_START_TIMEOUT = 120
GENERATION_TIMEOUT = 120
# No usage reports or update checks from Gradio, and no proxy between the browser and localhost. One torch
# thread, as in this process (`one_torch_thread_per_module`): the server samples with the arithmetic of the
# text the test expects.
QUIET_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost",
             "no_proxy": "127.0.0.1,localhost", "PYTHONIOENCODING": "utf-8", **ONE_THREAD}
pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt_best.pt")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_page(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the demo server exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the demo server did not answer at {url} within {SERVER_START_TIMEOUT}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    """What the demo server prints (stdout and stderr): its console."""
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="module")
def server(ckpt, server_log):
    """One demo server for the module's tests (each starts in seconds): they only send it requests."""
    pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[demo]'")
    port = free_port()
    log = server_log
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tinylm.cli", "demo", "--checkpoint", str(ckpt), "--port", str(port),
             "--device", "cpu"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **QUIET_ENV},
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_page(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no browser installed: the demo test needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1400", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver) -> list[str]:
    """Every URL the page asked for, from Chromium's network log."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_page_streams_the_models_text(browser, server, ckpt, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    # What the model writes for this prompt with the page's settings (defaults, but a long text) and seed.
    sampling = dataclasses.replace(demo.DEFAULT_SAMPLING, max_new_tokens=NEW_TOKENS)
    model, tokenizer = sampler.load(ckpt)
    expected = PROMPT + sampler.complete(model, tokenizer, PROMPT, sampling, demo.DEFAULT_SEED)

    browser.get(server)
    wait = WebDriverWait(browser, GENERATION_TIMEOUT)
    prompt_box = wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    prompt_box.send_keys(PROMPT)
    length_box = browser.find_element(By.CSS_SELECTOR, "#max-new-tokens input[type=number]")
    length_box.clear()
    length_box.send_keys(str(NEW_TOKENS), Keys.TAB)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    output = browser.find_element(By.CSS_SELECTOR, "#output textarea")
    seen = []  # every distinct value of the output box while waiting: the text arriving piece by piece

    def finished(_) -> bool:
        value = output.get_property("value")
        if not seen or seen[-1] != value:
            seen.append(value)
        return value == expected

    try:
        wait.until(finished)
    finally:
        browser.save_screenshot(str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    partial = [value for value in seen if PROMPT in value and value != expected]
    assert partial and all(expected.startswith(value) for value in partial), "the text did not stream in"

    origin = urlparse(server).netloc
    elsewhere = [url for url in requested_urls(browser)
                 if urlparse(url).scheme in ("http", "https", "ws", "wss") and urlparse(url).netloc != origin]
    assert not elsewhere, f"the page fetched from other hosts: {elsewhere}"


def test_demo_without_gradio_says_how_to_install_it(ckpt):
    """With `gradio` unimportable (as when the extra is not installed): one line, exit 2."""
    code = ("import sys; sys.modules['gradio'] = None\n"  # makes `import gradio` raise ImportError
            "from tinylm.cli import main\n"
            f"sys.exit(main(['demo', '--checkpoint', {str(ckpt)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: the demo needs Gradio, which is not installed: {demo.INSTALL_HINT}"


def test_page_starts_with_the_settings_of_tinylm_generate(ckpt):
    """Each control's first value is `tinylm generate`'s default for that flag (top-k too, on a vocab smaller than it)."""
    gr = pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[demo]'")
    model, tokenizer = sampler.load(ckpt)
    assert len(tokenizer) < generate.parse_args([]).top_k  # the case where the old page showed the vocab size
    app = demo.build_app(gr, model, tokenizer, title="test")
    shown = {block.elem_id: block.value for block in app.blocks.values() if getattr(block, "elem_id", None)}
    flags = generate.parse_args([])
    assert shown["max-new-tokens"] == flags.max_new_tokens
    assert shown["temperature"] == flags.temperature
    assert shown["top-k"] == flags.top_k
    assert shown["top-p"] == flags.top_p
    assert shown["seed"] == flags.seed


def test_a_prompt_the_tokenizer_cannot_read_is_one_message_and_no_traceback(server, server_log, monkeypatch):
    """An emoji prompt (the char tokenizer never saw it): the page gets the error, the console no traceback."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, QUIET_ENV[name])
    client = Client(server, verbose=False)
    with pytest.raises(AppError) as info:
        client.predict("\N{SLIGHTLY SMILING FACE} hello", 0.8, 200, 1.0, 20, 1337, api_name="/write")
    assert "the prompt has characters the tokenizer never saw in training" in str(info.value)
    assert "U+1F642" in str(info.value)
    time.sleep(1)  # the server writes its console on its own time
    console = server_log.read_text(encoding="utf-8")
    assert "Traceback" not in console and "UserError" not in console, console
