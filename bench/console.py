"""Progress messages on the console, timed from the start of the run, and how a
figure is printed."""

from __future__ import annotations

import time

STARTED = time.monotonic()


def say(message: str) -> None:
    """Progress on the console, with the time since the start of the run."""
    print(f"[{time.monotonic() - STARTED:4.0f} s] {message}", flush=True)


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )
