"""The coordinator's page in a real browser (headless Chromium through Selenium) while a
federation of tiny-model clients trains: as a person would look at it.

Needs the Debian packages chromium and chromium-driver (.ci/run installs them; README).
Where they are missing the test skips with a one-line reason.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from bench._browser import BrowserMissing, headless_chromium
from tests.harness import coordinator, make_tiny, until
from tests.test_dashboard import HOSTILE, raw_hello, start_clients

pytestmark = pytest.mark.integration


@pytest.fixture()
def browser() -> Any:
    try:
        driver = headless_chromium()
    except BrowserMissing as missing:
        if os.environ.get("EDGEFED_REQUIRE_BROWSER"):  # set by .ci/run: CI installs Chromium, so never skips
            pytest.fail(str(missing))
        pytest.skip(str(missing))
    yield driver
    driver.quit()


def wait_for(driver: Any, script: str, what: str, timeout: float = 120) -> Any:
    """Poll a JavaScript expression in the page until it is truthy; return its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: d.execute_script(f"return {script};"), message=f"the page never showed {what}")


def test_the_page_shows_a_running_federation_live_and_renders_hostile_text_inert(tmp_path: Path, browser: Any):
    tiny = make_tiny(tmp_path / "tiny")

    async def body() -> None:
        async with coordinator(tmp_path, tiny, rounds=0, min_clients=2, clients_per_round=2, quorum=2,
                               commit_wait_s=30) as server:
            url = f"ws://127.0.0.1:{server.port}"
            await asyncio.to_thread(browser.get, f"http://127.0.0.1:{server.port}/")
            await asyncio.to_thread(wait_for, browser, "document.body.dataset.snapshots", "a first snapshot", 30)
            before = int(await asyncio.to_thread(browser.execute_script,
                                                 "return document.getElementById('round').textContent;"))
            assert before == 0  # nobody has trained yet
            # A watcher whose free-text fields carry markup and script (client ids cannot: test_dashboard.py).
            hostile, _ = await raw_hello(url, client_id="hostile", plan=HOSTILE, device_name=HOSTILE,
                                         model_hash=tiny.model_hash)
            clients, observer, running = start_clients(tmp_path, tiny, url)
            await until(lambda: server.ledger.last_round() >= 2 and 2 in server._eval_losses, "2 rounds")

            def look() -> dict[str, Any]:
                wait_for(browser, "Number(document.body.dataset.round) >= 2", "round 2")
                wait_for(browser, "document.querySelectorAll('#loss-chart circle.point[data-series=eval]').length >= 2",
                         "the evaluator's losses")
                browser.save_screenshot(str(tmp_path / "dashboard.png"))
                return browser.execute_script("""
                    const rows = [...document.querySelectorAll('#clients tbody tr.client')];
                    return {
                      round: Number(document.getElementById('round').textContent),
                      ids: rows.map(r => r.dataset.clientId).sort(),
                      probe: document.querySelectorAll('#loss-chart circle.point[data-series=probe]').length,
                      bytes: document.querySelectorAll('#bytes-chart .point').length,
                      hostileText: rows.find(r => r.dataset.clientId === 'hostile').textContent,
                      images: document.querySelectorAll('img').length,
                      scripts: document.querySelectorAll('script').length,
                      pwned: window.__pwned === undefined ? null : window.__pwned,
                      ledger: document.getElementById('ledger-head').textContent,
                      connection: document.getElementById('connection').textContent,
                    };""")

            seen = await asyncio.to_thread(look)
            assert seen["round"] >= 2 > before  # the round number advanced while the page was open
            assert {"alpha", "beta"} <= set(seen["ids"]) and "hostile" in seen["ids"]
            assert seen["probe"] >= 2 and seen["bytes"] >= 2  # the charts have points
            assert seen["connection"] == "live"
            assert len(seen["ledger"]) > 16 and "round" in seen["ledger"]
            # The markup arrived as text: shown literally, nothing created from it, nothing run.
            assert HOSTILE in seen["hostileText"]
            assert seen["images"] == 0 and seen["scripts"] == 1 and seen["pwned"] is None
            assert (tmp_path / "dashboard.png").stat().st_size > 10_000
            print(f"screenshot: {tmp_path / 'dashboard.png'}")
            await hostile.close()
            for client in (*clients, observer):
                client.stop()
            await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), 60)

    asyncio.run(body())
