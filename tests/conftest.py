from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import STARTED, Mosquitto


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """A failing test must not leave a smame process running after the session."""
    yield
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One private Mosquitto for the test session; tests use their own client ids and units."""
    m = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield m
    m.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
