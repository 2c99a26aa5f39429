"""The HTML report in real headless Chromium: every chart drew, and nothing was fetched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from opsgate.store import open_store
from tests import history

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ("pass_rate", "rollback_time", "blocks", "stops")


def chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def report_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("html")
    url = f"sqlite:///{directory}/history.db"
    store = open_store(url)
    store.migrate()
    now = datetime.now(UTC)
    history.write(store, history.generate(1500, seed=11, start=now - timedelta(days=29), end=now))
    store.close()
    out = directory / "report.html"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")},
        "OPSGATE_DB": url,
    }
    done = subprocess.run(
        [sys.executable, "-m", "opsgate", "report", "--format", "html", "-o", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return out


def test_the_report_is_one_self_contained_file(report_file: Path) -> None:
    text = report_file.read_text(encoding="utf-8")
    # No external script, stylesheet or font: the page works offline. (plotly.js itself
    # mentions its CDN for optional map data; the Chromium test proves nothing is fetched.)
    for needle in ("<script src=", "<link ", "@import"):
        assert needle not in text
    for name in CHARTS:
        assert f"data-chart='{name}'" in text


def test_every_chart_renders_in_headless_chromium_without_network(report_file: Path) -> None:
    found = chromium()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing: run `make system-deps`")
        pytest.skip("chromium and chromedriver are not installed")
    browser, driver_path = found
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(report_file.as_uri())
        drawn = driver.execute_script(
            """
            const out = {};
            for (const box of document.querySelectorAll('[data-chart]')) {
              const svg = box.querySelector('svg.main-svg');
              const marks = box.querySelectorAll(
                'g.trace path, g.trace rect, g.points path, g.bars path'
              ).length;
              out[box.dataset.chart] = {svg: !!svg, children: svg ? svg.childElementCount : 0,
                                       marks: marks};
            }
            return out;
            """
        )
        requests = [
            json.loads(entry["message"])["message"] for entry in driver.get_log("performance")
        ]
    finally:
        driver.quit()
    assert set(drawn) == set(CHARTS)
    for name, chart in drawn.items():
        assert chart["svg"] and chart["children"] > 0, (name, chart)
        assert chart["marks"] > 0, f"chart {name} drew no data marks: {chart}"
    urls = [
        r["params"]["request"]["url"]
        for r in requests
        if r.get("method") == "Network.requestWillBeSent"
    ]
    assert urls, "the performance log recorded no request at all (not even the page)"
    left = [u for u in urls if not u.startswith(("file://", "data:", "about:", "blob:"))]
    assert left == [], f"requests left the page: {left}"
