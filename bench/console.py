"""Progress messages on the console, timed from the start of the run."""

from __future__ import annotations

import time

STARTED = time.monotonic()


def say(message: str) -> None:
    """Progress on the console, with the time since the start of the run."""
    print(f"[{time.monotonic() - STARTED:4.0f} s] {message}", flush=True)
