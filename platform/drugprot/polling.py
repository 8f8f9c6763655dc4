"""The one wait loop: ask until there is an answer, the time is up, or someone says stop.

Used by every place that waits for something to come up (a Ray head, an MLflow server, a Serve application, the
test fixtures' servers), so they all stop at the deadline the same way and none spins or sleeps past a stop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(attempt: Callable[[], T | None], *, timeout: float, interval: float = 0.5,
         stop: threading.Event | None = None) -> T | None:
    """Call ``attempt`` until it returns something other than None (returned), ``timeout`` seconds have passed or
    ``stop`` is set (None). It is always called at least once; an exception it raises ends the wait (a process that
    died while being waited for, say)."""
    deadline = time.monotonic() + timeout
    while True:
        result = attempt()
        if result is not None:
            return result
        left = deadline - time.monotonic()
        if left <= 0 or (stop is not None and stop.is_set()):
            return None
        if stop is not None:
            stop.wait(min(interval, left))
        else:
            time.sleep(min(interval, left))
