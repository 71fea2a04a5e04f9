"""smame: meter-reading backend for SmaMe II LTE-M communication units."""

import os
import signal
import sys

__version__ = "0.1.0"


def _interrupted(signum: int, frame: object) -> None:
    """Ctrl-C while smame's modules load (the command's first, compiled on a fresh install): one line and out."""
    os.write(2, b"\nsmame: interrupted\n")
    os._exit(130)


# Run as the command (`python -m smame.cli`, whose package is imported while argv[0] is still "-m", or the
# `smame` console script), not imported by another program: from here on, before the command's module is
# even compiled, Ctrl-C is one line and exit 130 (`smame.cli.main` takes it over once everything is loaded).
if sys.argv and (sys.argv[0] == "-m" or os.path.basename(sys.argv[0]) == "smame"):
    signal.signal(signal.SIGINT, _interrupted)
