"""The router's status page in headless Chromium (Selenium): it renders workers and charts, and its
buttons drive the admin API. Needs Debian's ``chromium`` + ``chromium-driver`` and ``selenium``."""

from __future__ import annotations

import os
import shutil
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fakes.router_harness import RouterHarness, wait_for  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
TOKEN = "page-token"

if not os.path.exists(CHROMIUM) or shutil.which("chromedriver") is None:
    pytest.skip("headless Chromium not installed: apt-get install -y chromium chromium-driver",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402


@pytest.fixture
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    yield driver
    driver.quit()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _cell_text(browser, worker: str, col: int) -> str:
    # read in one script: the table is re-rendered every poll, so element handles go stale
    return browser.execute_script(
        "const c=document.querySelector(arguments[0]);return c?c.textContent:null;",
        f'tr[data-worker="{worker}"] td:nth-child({col})')


def _click(browser, selector: str) -> None:
    browser.execute_script("document.querySelector(arguments[0]).click();", selector)


def test_status_page_renders_and_buttons_call_admin(tmp_path, browser):
    h = RouterHarness(tmp_path, admin_token=TOKEN)
    try:
        h.add_worker("pw", [40, 41, 42], role="prefill", delay=0.01)
        h.add_worker("dw", [40, 41, 42], role="decode", delay=0.01)
        for n in (3, 5, 8):
            h.client().completions.create(model="builtin:tiny-random-llama", prompt="hi", max_tokens=n)
        browser.get(h.url + "/status")
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")) == 2, what="worker rows")
        assert _cell_text(browser, "pw", 2) == "prefill" and _cell_text(browser, "dw", 3) == "healthy"
        assert browser.find_element(By.ID, "health").text == "healthy"
        series_pixels = ("const d=document.getElementById(arguments[0]).getContext('2d')"
                         ".getImageData(0,0,520,180).data;let n=0;"
                         "for(let i=0;i<d.length;i+=4){if(d[i+3]>0&&d[i+2]>150&&d[i+2]-d[i]>80)n++;}return n;")
        for chart in ("ttft", "tpot"):  # three requests: three points in the series colour
            wait_for(lambda: browser.execute_script(series_pixels, chart) >= 3 * 25, what=f"{chart} series drawn")
        shot = browser.get_screenshot_as_png()
        (tmp_path / "status.png").write_bytes(shot)
        assert _png_size(shot) == tuple(browser.execute_script("return [window.innerWidth, window.innerHeight]"))
        assert len(shot) > 10_000  # a rendered table and charts, not a blank page

        browser.find_element(By.ID, "token").send_keys(TOKEN)
        _click(browser, 'button[data-action="drain"][data-worker="dw"]')
        wait_for(lambda: {"type": "Drain"} in h.events("dw"), what="Drain at the worker")
        wait_for(lambda: _cell_text(browser, "dw", 3) == "draining", what="row shows draining")
        _click(browser, 'button[data-action="role-both"][data-worker="pw"]')
        wait_for(lambda: {"type": "SetRole", "role": "both"} in h.events("pw"), what="SetRole at the worker")
        wait_for(lambda: _cell_text(browser, "pw", 2) == "both", what="row shows the new role")
    finally:
        h.stop()


def test_status_page_wrong_token_shows_error(tmp_path, browser):
    h = RouterHarness(tmp_path, admin_token=TOKEN)
    try:
        h.add_worker("w", [40], role="both")
        browser.get(h.url + "/")
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, 'tr[data-worker="w"]'), what="worker row")
        browser.find_element(By.ID, "token").send_keys("wrong")
        _click(browser, 'button[data-action="drain"][data-worker="w"]')
        wait_for(lambda: "401" in browser.find_element(By.ID, "message").text, what="401 message")
        assert not any(e["type"] == "Drain" for e in h.events("w"))
    finally:
        h.stop()
