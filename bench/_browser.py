"""Headless Chromium through Selenium, for the page's test and bench/dashboard.py.

It drives the Debian packages (``apt-get install chromium chromium-driver``; .ci/run
installs them): both paths are given to Selenium and Selenium Manager is kept offline,
so nothing is downloaded (this project's machines reach no hub at run time).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

__all__ = ["BrowserMissing", "headless_chromium"]

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver",)


class BrowserMissing(RuntimeError):
    """No Chromium, driver or selenium here; the message says which, in one line."""


def _find(names: tuple[str, ...], extra: tuple[str, ...] = ()) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return next((path for path in extra if os.access(path, os.X_OK)), None)


def headless_chromium(width: int = 1280, height: int = 900) -> Any:
    """A started headless Chromium WebDriver (the caller quits it).

    Raises:
        BrowserMissing: selenium, chromium or chromedriver is not installed.
    """
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserMissing("selenium is not installed (pip install -e '.[test]')") from None
    browser = _find(CHROMIUM_NAMES)
    driver = _find(DRIVER_NAMES, ("/usr/lib/chromium/chromedriver",))
    if browser is None or driver is None:
        raise BrowserMissing("Chromium or its driver is missing (apt-get install chromium chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))
