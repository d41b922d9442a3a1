"""What a guarded statement did, as types the routes can match on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NotFound:
    """No such job (or worker, or event)."""


@dataclass(frozen=True)
class Moved:
    """The guard let the change through; ``job_json`` is the job after it."""

    job_json: str


@dataclass(frozen=True)
class Refused:
    """The guard refused: the job is ``status``, from which the change is not allowed."""

    status: str
    job_json: str | None = None


@dataclass(frozen=True)
class Blocked:
    """An all-or-nothing change did nothing: job ``job_id`` is ``status``."""

    job_id: int
    status: str


@dataclass(frozen=True)
class Deleted:
    count: int = 1


NOT_FOUND = NotFound()
