"""Process checks shared by the tests that kill or stop processes."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie (exited, not reaped yet) counts as gone, since it still
    answers kill(0) but holds no pipe, lock or port any more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
