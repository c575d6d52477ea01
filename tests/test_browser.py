"""The leaderboard in a real browser: headless Chromium renders the rank table, sorts it on a
header click, shows a hostile name as text without running it, and works through `serve`.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``) and the ``selenium`` package; without them the test fails, it is
never skipped, so a CI image that lost them cannot pass silently.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from helpers import (make_record, random_scores, submission_block, trust_test_key,
                     write_record, write_site_task)
from metabench.site.build import build
from metabench.site.serve import make_server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
EVIL = "<script>alert(1)</script>"
INSTALL = ("the browser test needs Debian's chromium and chromium-driver "
           "(`apt-get install -y chromium chromium-driver`, giving /usr/bin/chromium and "
           "/usr/bin/chromedriver) and `pip install selenium`")

# (name, IQM, mean): IQM order alpha, EVIL, charlie; mean order alpha, charlie, EVIL.
RULES = (("alpha", 0.8, 0.45), (EVIL, 0.6, 0.90), ("charlie", 0.4, 0.50))


def _driver():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"{INSTALL}: {e}")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{INSTALL}; missing: {', '.join(missing)}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1400,1000", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    # An explicit driver path keeps Selenium Manager from trying to download one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    return driver, profile


@pytest.fixture(scope="module")
def browser():
    driver, profile = _driver()
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    fp = write_site_task(root / "tasks", "t", "browser test task")
    trust_test_key(root / "keys")
    rng = np.random.default_rng(0)
    for i, (name, iqm, mean) in enumerate(RULES):
        rec = make_record("t", fp, name, random_scores(rng, iqm), iqm=iqm,
                          iqm_ci=(iqm - 0.05, iqm + 0.05), mean=mean,
                          submission=submission_block(name), verified=True)
        write_record(root / "results", f"rule{i}", rec)
    return build(root / "results", root / "site", root / "tasks", bootstrap_reps=200).parent


def _names(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [r.get_attribute("data-submission")
            for r in driver.find_elements(By.CSS_SELECTOR, "#rank-table tbody tr.rank-row")]


def _no_alert(driver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text


def _check_task_page(driver) -> None:
    from selenium.webdriver.common.by import By

    assert _names(driver) == [n for n, _, _ in RULES]  # by IQM
    header = lambda key: driver.find_element(By.CSS_SELECTOR,  # noqa: E731
                                             f'#rank-table th[data-key="{key}"]')
    header("mean").click()
    assert _names(driver) == ["alpha", "charlie", EVIL]  # ascending mean
    assert header("mean").get_attribute("aria-sort") == "ascending"
    header("mean").click()
    assert _names(driver) == [EVIL, "charlie", "alpha"]
    header("rule").click()
    assert _names(driver) == sorted((n for n, _, _ in RULES), key=str.lower)
    header("rank").click()
    assert _names(driver) == [n for n, _, _ in RULES]
    links = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "#rank-table a")]
    assert EVIL in links  # rendered as literal text
    _no_alert(driver)


def test_task_page_renders_sorts_and_escapes(browser, site):
    from selenium.webdriver.common.by import By

    browser.get((site / "tasks" / "t.html").as_uri())
    assert browser.title.startswith("t ")
    _check_task_page(browser)
    assert not browser.find_elements(By.XPATH, "//script[contains(., 'alert(1)')]")
    # the hostile submission's own page: a heading of text, and no script of its own
    browser.find_element(By.LINK_TEXT, EVIL).click()
    assert EVIL in browser.find_element(By.TAG_NAME, "h1").text
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 1
    _no_alert(browser)
    browser.find_element(By.LINK_TEXT, "metabench leaderboard").click()
    assert browser.current_url.endswith("/index.html")
    assert "t" in [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#task-table a")]


def test_serve_on_localhost(browser, site):
    from selenium.webdriver.common.by import By

    server = make_server(site, port=0, host="127.0.0.1")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        browser.get(f"http://{host}:{port}/")
        assert browser.title == "metabench leaderboard"
        browser.find_element(By.LINK_TEXT, "t").click()
        assert browser.current_url == f"http://{host}:{port}/tasks/t.html"
        _check_task_page(browser)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()
