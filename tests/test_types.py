"""The code is typed (mypy strict, as pyproject.toml configures it): a wrong type fails the suite, not production."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_mypy_strict_finds_no_errors() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
