"""The report's page as a reader's browser shows it: Debian's headless Chromium driven
through its chromedriver (Selenium), never a browser downloaded at run time.

    python -m tests.browser report/index.html shot.png     a screenshot of the whole page
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

# Debian's packages `chromium` and `chromium-driver` (make test installs them where it may)
CHROMIUM = ("chromium", "chromium-browser")
DRIVER = "chromedriver"


def missing() -> str | None:
    """Why a page cannot be opened here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install '.[report]')"
    if not any(shutil.which(b) for b in CHROMIUM) or not shutil.which(DRIVER):
        return ("Chromium and its driver are not installed (Debian: apt-get install "
                "chromium chromium-driver; make test does it where it may)")
    return None


@dataclass
class Page:
    errors: list[str]      # the console's errors and the page's uncaught exceptions
    counts: dict           # CSS selector -> elements found
    rendered: dict         # CSS selector -> elements with a drawn size (width and height > 0)
    title: str


def open_page(path: Path, selectors: list[str], screenshot: Path | None = None,
              width: int = 1300) -> Page:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(b) for b in CHROMIUM if shutil.which(b))
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},1000", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which(DRIVER)), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(Path(path).resolve().as_uri())
        counts, rendered = {}, {}
        for sel in selectors:
            found = driver.find_elements("css selector", sel)
            counts[sel] = len(found)
            rendered[sel] = sum(1 for e in found
                                if e.size["width"] > 0 and e.size["height"] > 0)
        errors = [f"{e['level']}: {e['message']}" for e in driver.get_log("browser")
                  if e["level"] in ("SEVERE", "ERROR")]
        if screenshot:
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(width, min(int(height) + 40, 16000))
            driver.save_screenshot(str(screenshot))
        return Page(errors, counts, rendered, driver.title)
    finally:
        driver.quit()


if __name__ == "__main__":
    page = open_page(Path(sys.argv[1]), ["table", "figure svg"], Path(sys.argv[2]))
    print(f"{page.title}: {page.counts}; console errors: {page.errors or 'none'}")
