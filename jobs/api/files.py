"""Files a worker writes, and the per-table progress along their canonical chain."""

from __future__ import annotations

from jobs import db
from jobs.api import endpoint
from jobs.api.jobs import JOB_ERRORS, job_not_found, stale_attempt
from jobs.domain import MAX_BATCH
from jobs.errors import ApiError
from jobs.responses import json_with_fragments
from jobs.schemas import (
    FileBatchSchema,
    FilesQuerySchema,
    FilesRegisteredSchema,
    JobPath,
    JobTablePath,
    ProgressSchema,
)
from jobs.store import files as file_store
from jobs.store.files import FileConflict
from jobs.store.jobs import Stale
from jobs.store.outcomes import NotFound, Refused


@endpoint(
    "/jobs/<job_id>/progress",
    "GET",
    access="read",
    error_code="GET_JOB_ERROR",
    replica=True,
    summary="Per-table progress along each table's canonical chain of files",
    path=JobPath,
    responses={200: ProgressSchema},
    errors=JOB_ERRORS,
)
def get_progress(job_id):
    with db.cursor() as cur:
        progress = file_store.get_progress(cur, job_id)
    if isinstance(progress, NotFound):
        raise job_not_found(job_id)
    return json_with_fragments(
        {"job_id": job_id, "job_status": progress.job_status}, tables=progress.tables_json
    )


@endpoint(
    "/jobs/<job_id>/tables/<table>/files",
    "POST",
    access="worker",
    error_code="REGISTER_FILES_ERROR",
    summary=f"A worker registers written files (one object, or an array of up to {MAX_BATCH});"
    " fenced by ?node_id= and ?attempt= when given",
    path=JobTablePath,
    query=FilesQuerySchema,
    body=FileBatchSchema,
    responses={201: FilesRegisteredSchema, 200: FilesRegisteredSchema},
    errors={**JOB_ERRORS, 409: ("STALE_ATTEMPT", "JOB_CONFLICT", "FILE_CONFLICT")},
)
def register_files(job_id, table, node_id, attempt, body):
    # All or nothing: an ApiError raised inside the transaction rolls the batch back.
    with db.transaction() as cur:
        match file_store.register_files(cur, job_id, table, body["files"], node_id, attempt):
            case NotFound():
                raise job_not_found(job_id)
            case Stale() as stale:
                raise stale_attempt(job_id, stale, "files")
            case Refused(status):
                raise ApiError(
                    409,
                    "JOB_CONFLICT",
                    f"job {job_id} is {status}: files are accepted only while active",
                )
            case FileConflict(file_name):
                raise ApiError(
                    409,
                    "FILE_CONFLICT",
                    f"file {file_name!r} is already registered with other fields by this attempt",
                )
            case registered:
                pass
    counts = {"registered": registered.registered, "unchanged": registered.unchanged}
    return json_with_fragments(
        {"job_id": job_id, "table": table, **counts},
        201 if registered.registered else 200,
        progress=registered.progress_json,
    )
