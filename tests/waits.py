"""Waiting for a condition in tests: only where no event exists to wait on (another
process's state, a metric, a file); prefer an ``Event``, a future or a socket poll."""

from __future__ import annotations

import time
from typing import Callable


def wait_until(check: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    """Return once ``check()`` is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)
