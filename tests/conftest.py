from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.databases import ADMIN_URL, BACKENDS, PostgresDatabase
from tests.helpers import STARTED, Mosquitto


@pytest.fixture(autouse=True)
def no_process_outlives_its_test() -> Iterator[None]:
    """A smame process a test started is stopped when the test ends, passed or failed: a failure half-way
    must not leave it holding ports, the store and CPU while the next tests run (SIGTERM, then SIGKILL)."""
    before = len(STARTED)
    yield
    for proc in STARTED[before:]:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(12)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    del STARTED[before:]


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One private Mosquitto for the test session; tests use their own client ids and units."""
    m = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield m
    m.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabase]:
    """The test run's own database on the machine's PostgreSQL, dropped when the run ends."""
    try:
        db = PostgresDatabase()
    except psycopg.OperationalError as exc:
        pytest.fail(f"the tests need PostgreSQL at {ADMIN_URL} (or set SMAME_TEST_POSTGRES): {exc}")
    yield db
    db.drop()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store's URL, once on each backend: an SQLite file, and a schema of its own in PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'smame.db'}"
    db: PostgresDatabase = request.getfixturevalue("postgres")
    return db.fresh_url()


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Debian's chromium, headless, through its chromedriver: the console's pages as an operator sees them."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("the console tests need Debian's chromium and chromium-driver (scripts/setup installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield chrome
    finally:
        chrome.quit()
