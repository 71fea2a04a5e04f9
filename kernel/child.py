"""What smame's child processes do first: take a name that ps and top show, and end with their parent."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


def name_process(name: str) -> None:
    """Call this process `name` where ps and top show it (Linux; elsewhere nothing)."""
    try:
        Path("/proc/self/comm").write_text(name)
    except OSError:
        pass


def become_child(name: str) -> None:
    """In a child process: take `name`, ignore Ctrl-C (it reaches the whole process group, but the parent ends
    its children), and end with the parent even when it could not end them (kill -9, the OOM killer): a child
    waiting on a queue or a pipe it holds both ends of would never see it close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name_process(name)
    threading.Thread(target=_exit_with, args=(os.getppid(),), name="parent-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


class Stopped(Exception):
    """A long job was asked to stop (smame is stopping) and did, between two of its steps."""
