"""Every request and response shape of the Jobs API, once.

These marshmallow schemas validate what comes in, describe what goes out, and
feed the OpenAPI document. Hot read paths let PostgreSQL build the response
JSON (see app.py); the tests check those bytes against these schemas.
"""

from __future__ import annotations

from decimal import Decimal
from typing import ClassVar

from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    pre_load,
    validate,
    validates_schema,
)

from jobs import parse
from jobs.domain import (
    ACTIVE_STATUSES,
    DEFAULT_PAGE_SIZE,
    DEFAULT_WORKER_PAGE_SIZE,
    EVENT_TYPES,
    EVENTS_PAGE_BYTES,
    HASH_PATTERN,
    JOB_ID_RULE,
    MAX_ATTEMPT_VALUE,
    MAX_ATTEMPTS_LIMIT,
    MAX_BATCH,
    MAX_BLOCK,
    MAX_DESCRIPTOR_BYTES,
    MAX_DETAIL_BYTES,
    MAX_EVENTS_PAGE,
    MAX_JOB_ID,
    MAX_NODE_ID_LENGTH,
    MAX_NUMERIC_FRACTION_DIGITS,
    MAX_NUMERIC_INTEGER_DIGITS,
    MAX_PAGE_SIZE,
    MAX_WAIT_S,
    NODE_ID_PATTERN,
    REPORTABLE_STATUSES,
    STATUSES,
    TABLE_PATTERN,
    TIMESTAMP_PATTERN,
    WORKER_STATUSES,
    parse_job_id,
)
from jobs.store.sql import json_bytes


def _jsonb_check(value) -> tuple[str | None, int]:
    """Why PostgreSQL's jsonb cannot store ``value`` as given (or None), and how many
    bytes more than compact JSON with str(number) its numbers take as jsonb writes them.

    jsonb cannot hold U+0000 in a string. Its numbers are numeric, which keeps
    a decimal exactly (parse.load_body reads fractions as Decimal) within
    MAX_NUMERIC_*_DIGITS, so a number beyond that is refused, not rounded; and
    it writes them without an exponent: 1e300 comes back as 301 digits, so the
    size bounds count that, not the 5 bytes of the body.
    """
    pending, growth = [value], 0
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return "must not contain the character U+0000.", growth
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, Decimal):
            _, digits, exponent = value.as_tuple()
            if -exponent > MAX_NUMERIC_FRACTION_DIGITS:
                limit = f"{MAX_NUMERIC_FRACTION_DIGITS} digits after the point"
                return f"numbers have at most {limit}.", growth
            if value.adjusted() >= MAX_NUMERIC_INTEGER_DIGITS:
                limit = f"{MAX_NUMERIC_INTEGER_DIGITS} digits before the point"
                return f"numbers have at most {limit}.", growth
            # At least as long as format(value, "f"), what PostgreSQL writes.
            plain = 1 + len(digits) + (exponent if exponent >= 0 else 2 - exponent)
            growth += max(0, plain - len(str(value)))
    return None, growth


class JsonObject(fields.Dict):
    """Any JSON object, stored as JSONB (see _jsonb_check); when ``max_bytes`` is
    given, at most that many bytes as compact JSON with numbers as jsonb writes them."""

    def __init__(self, max_bytes: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_bytes = max_bytes

    def _deserialize(self, value, attr, data, **kwargs):
        result = super()._deserialize(value, attr, data, **kwargs)
        problem, growth = _jsonb_check(result)
        if problem:
            raise ValidationError(problem)
        if self.max_bytes is not None:
            size = len(json_bytes(result)) + growth
            if size > self.max_bytes:
                raise ValidationError(
                    f"must be at most {self.max_bytes} bytes as compact JSON (UTF-8);"
                    f" this one is {size}."
                )
        return result


class JobId(fields.Field):
    """A job ID: a JSON integer or a string of digits, in 1..2^63-1."""

    default_error_messages: ClassVar[dict[str, str]] = {
        "invalid": f"Not a valid job ID ({JOB_ID_RULE})."
    }

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool):
            raise self.make_error("invalid")
        if isinstance(value, int):
            if 1 <= value <= MAX_JOB_ID:
                return value
            raise self.make_error("invalid")
        if isinstance(value, str) and (job_id := parse_job_id(value)) is not None:
            return job_id
        raise self.make_error("invalid")


class FullMatch(validate.Regexp):
    """``validate.Regexp`` over the whole value: with re.match, ``$`` lets a trailing newline in."""

    def __call__(self, value):
        if not isinstance(value, str) or self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


class StrictBoolean(fields.Boolean):
    """A JSON true or false, and nothing that merely reads as one ("true", 1, "yes")."""

    default_error_messages: ClassVar[dict[str, str]] = {"invalid": "Not a JSON boolean."}

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


def Attempt(**kwargs) -> fields.Integer:
    """An attempt a worker names: a JSON integer, at least 1 (never null, a string or a float)."""
    return fields.Integer(
        strict=True, allow_none=False, validate=validate.Range(1, MAX_ATTEMPT_VALUE), **kwargs
    )


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


def no_nul(value: str) -> None:
    if "\x00" in value:
        raise ValidationError("must not contain the character U+0000.")


def Timestamp(**kwargs) -> fields.String:
    """A timestamp as the API writes it: RFC 3339, UTC, six fractional digits, Z."""
    return fields.String(required=True, validate=validate.Regexp(TIMESTAMP_PATTERN), **kwargs)


def NodeId(**kwargs) -> fields.String:
    """A worker's node_id (NODE_ID_RULE)."""
    return fields.String(
        validate=[validate.Length(1, MAX_NODE_ID_LENGTH), FullMatch(NODE_ID_PATTERN)], **kwargs
    )


class Param(fields.Field):
    """A path or query value, parsed by its rule in parse.py, which answers its own coded 400.

    ``openapi`` is what the OpenAPI document says of it (api/openapi.py).
    """

    def __init__(self, rule, openapi: dict, default=None, **kwargs):
        # The value when absent, handed over as is (not parsed, and not the
        # document's "default", which a few params state in ``openapi``).
        if not kwargs.get("required"):
            kwargs["load_default"] = lambda: default
        super().__init__(**kwargs)
        self.rule, self.openapi = rule, openapi

    def _deserialize(self, value, attr, data, **kwargs):
        return self.rule(value)


# ---- Responses -------------------------------------------------------------


class ErrorSchema(Schema):
    error_code = fields.String(required=True, metadata={"example": "JOB_NOT_FOUND"})
    error_message = fields.String(required=True)


class JobSchema(Schema):
    id = fields.Integer(required=True, validate=validate.Range(1, MAX_JOB_ID))
    created_at = Timestamp()
    updated_at = Timestamp()
    node_id = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    attempt = fields.Integer(
        required=True,
        validate=validate.Range(min=1),
        metadata={"description": "1 for the first run, +1 on every retry (FAILED -> SCHEDULED)"},
    )
    max_attempts = fields.Integer(
        required=True,
        validate=validate.Range(1, MAX_ATTEMPTS_LIMIT),
        metadata={"description": "attempts before a failure is final (1: no automatic retry)"},
    )
    retry_at = fields.String(
        required=True,
        allow_none=True,
        validate=validate.Regexp(TIMESTAMP_PATTERN),
        metadata={
            "description": "when the automatic retry is due; null unless FAILED and waiting for it"
        },
    )
    descriptor = fields.Dict(required=True)


class JobListSchema(Schema):
    jobs = fields.List(fields.Nested(JobSchema), required=True)
    next_cursor = fields.Integer(
        required=True,
        allow_none=True,
        metadata={"description": "last_job_id for the next page; null on the last page"},
    )


class TableProgressSchema(Schema):
    start_block = fields.Integer(required=True, allow_none=True)
    current_block = fields.Integer(required=True, allow_none=True)
    files_count = fields.Integer(required=True)
    total_size_bytes = fields.Integer(required=True)


class ProgressSchema(Schema):
    job_id = fields.Integer(required=True)
    job_status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    tables = fields.Dict(
        keys=fields.String(), values=fields.Nested(TableProgressSchema), required=True
    )


class EventSchema(Schema):
    id = fields.Integer(required=True)
    created_at = Timestamp()
    event_type = fields.String(required=True, validate=validate.OneOf(EVENT_TYPES))
    node_id = fields.String(required=True, allow_none=True)
    detail = fields.Dict(required=True, allow_none=True)


class EventListSchema(Schema):
    job_id = fields.Integer(required=True)
    events = fields.List(
        fields.Nested(EventSchema),
        required=True,
        metadata={
            "description": f"oldest first, at most limit (default {MAX_EVENTS_PAGE}), and fewer "
            f"once their JSON reaches {EVENTS_PAGE_BYTES // (1024 * 1024)} MiB (at least one)"
        },
    )
    next_cursor = fields.Integer(
        required=True,
        allow_none=True,
        metadata={"description": "after= for the next page: null when no more events follow"},
    )


class JobEventSchema(Schema):
    """One event, with its job: GET /jobs/{job_id}/events/{event_id}."""

    id = fields.Integer(required=True)
    job_id = fields.Integer(required=True)
    created_at = Timestamp()
    node_id = fields.String(required=True, allow_none=True)
    event_type = fields.String(required=True, validate=validate.OneOf(EVENT_TYPES))
    detail = fields.Dict(required=True, allow_none=True)


# What a build describes itself with fits in far less; without a bound a worker
# token could store a megabyte per field for GET /workers/{id} to serve back.
MAX_INFO_FIELD = 256


def _info_field(description: str) -> fields.String:
    return fields.String(
        validate=[validate.Length(max=MAX_INFO_FIELD), no_nul],
        metadata={"description": description},
    )


class WorkerMetadataSchema(StrictSchema):
    """What a worker says about its build (each field optional; stored as given)."""

    version = _info_field("e.g. v1.4.2 or git describe output")
    commit_sha = _info_field("the commit it was built from")
    commit_timestamp = _info_field("when that commit was made (RFC 3339 suggested)")
    build_date = _info_field("when it was built (RFC 3339 suggested)")


class WorkerSchema(Schema):
    node_id = fields.String(required=True)
    info = fields.Nested(WorkerMetadataSchema, required=True)
    created_at = Timestamp()
    registered_at = Timestamp()
    heartbeat_at = Timestamp()
    status = fields.String(required=True, validate=validate.OneOf(WORKER_STATUSES))


class WorkerSummarySchema(Schema):
    node_id = fields.String(required=True)
    heartbeat_at = Timestamp()
    status = fields.String(required=True, validate=validate.OneOf(WORKER_STATUSES))


class WorkerListSchema(Schema):
    workers = fields.List(
        fields.Nested(WorkerSummarySchema),
        required=True,
        metadata={"description": "most recently registered first"},
    )
    next_cursor = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "cursor=... for the next page, as it is; null on the last page"},
    )


class LeaseSchema(Schema):
    job_id = fields.Integer(required=True)
    attempt = fields.Integer(required=True, metadata={"description": "the fencing token"})
    status = fields.String(required=True, validate=validate.OneOf(ACTIVE_STATUSES))


class HeartbeatSchema(Schema):
    node_id = fields.String(required=True)
    heartbeat_at = Timestamp()
    scheduled = fields.List(
        fields.Integer(),
        required=True,
        metadata={"description": "the worker's SCHEDULED jobs, oldest first, at most 1000"},
    )
    stop_requested = fields.List(
        fields.Integer(),
        required=True,
        metadata={"description": "the worker's STOP_REQUESTED jobs, oldest first, at most 1000"},
    )
    leases = fields.List(
        fields.Nested(LeaseSchema),
        required=True,
        metadata={
            "description": "every active job of the worker with its attempt, oldest first, "
            "at most 1000: report with node_id and that attempt"
        },
    )


class FilesRegisteredSchema(Schema):
    job_id = fields.Integer(required=True)
    table = fields.String(required=True)
    registered = fields.Integer(required=True, metadata={"description": "files newly stored"})
    unchanged = fields.Integer(
        required=True, metadata={"description": "files already stored with identical fields"}
    )
    progress = fields.Nested(TableProgressSchema, required=True)


class HealthSchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(("ok", "unavailable")))
    error_code = fields.String()
    error_message = fields.String()


class BulkDeleteProgressSchema(StrictSchema):
    """DELETE /jobs?status= when its time budget ran out before every matching job was gone."""

    deleted = fields.Integer(
        required=True,
        validate=validate.Range(min=0),
        metadata={"description": "jobs this request deleted (each with its events, tables, files)"},
    )
    more = fields.Boolean(
        required=True,
        validate=validate.OneOf([True]),
        metadata={
            "description": "always true: matching jobs may remain; repeat the request "
            "until it answers 204"
        },
    )


# ---- Requests --------------------------------------------------------------


# Path parameters and queries: each value is parsed by a rule of parse.py,
# before the view runs (api/registry.py), with the code docs/API.md lists.
JOB_ID_DOC = {"type": "integer", "minimum": 1, "maximum": MAX_JOB_ID}
NODE_ID_DOC = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_NODE_ID_LENGTH,
    "pattern": NODE_ID_PATTERN,
}


class JobPath(Schema):
    job_id = Param(parse.job_id_from_path, JOB_ID_DOC, required=True)


class JobEventPath(JobPath):
    event_id = Param(parse.event_id_from_path, JOB_ID_DOC, required=True)


class JobTablePath(JobPath):
    table = Param(
        parse.table_from_path, {"type": "string", "pattern": TABLE_PATTERN}, required=True
    )


class WorkerPath(Schema):
    node_id = Param(parse.worker_id_from_path, NODE_ID_DOC, required=True)


class ListJobsQuerySchema(Schema):
    limit = Param(
        parse.limit_from_query,
        {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE, "default": DEFAULT_PAGE_SIZE},
        default=DEFAULT_PAGE_SIZE,
        metadata={"description": f"page size, 1..{MAX_PAGE_SIZE} (default {DEFAULT_PAGE_SIZE})"},
    )
    last_job_id = Param(
        parse.cursor_from_query,
        JOB_ID_DOC,
        metadata={"description": "cursor: only jobs with a smaller id"},
    )
    status = Param(
        parse.list_statuses_from_query,
        {"type": "string"},
        default=ACTIVE_STATUSES,
        metadata={
            "description": "comma-separated, case-insensitive: a status name, active "
            "(default), terminal, all, or error (= FAILED)"
        },
    )
    node_id = Param(
        parse.node_id_from_query,
        NODE_ID_DOC,
        metadata={"description": "only jobs of this node"},
    )


class FilesQuerySchema(Schema):
    """Who registers the files (optional): the fence of POST /jobs/{job_id}/tables/{table}/files."""

    node_id = Param(
        parse.node_id_from_query,
        NODE_ID_DOC,
        metadata={"description": "the registering worker; not the job's node: 409 STALE_ATTEMPT"},
    )
    attempt = Param(
        parse.attempt_from_query,
        {"type": "integer", "minimum": 1, "maximum": MAX_ATTEMPT_VALUE},
        metadata={"description": "the attempt it runs; not the job's: 409 STALE_ATTEMPT"},
    )


WAIT_DOC = {"type": "integer", "minimum": 0, "maximum": MAX_WAIT_S, "default": 0}


class EventsQuerySchema(Schema):
    after = Param(
        parse.after_from_query,
        JOB_ID_DOC,
        metadata={"description": "only events with a larger id (an event id)"},
    )
    limit = Param(
        parse.events_limit_from_query,
        {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_EVENTS_PAGE,
            "default": MAX_EVENTS_PAGE,
        },
        default=MAX_EVENTS_PAGE,
        metadata={"description": f"page size, 1..{MAX_EVENTS_PAGE} (default {MAX_EVENTS_PAGE})"},
    )
    wait = Param(
        parse.wait_from_query,
        WAIT_DOC,
        default=0,
        metadata={
            "description": "seconds to wait for the first event after `after` (or after "
            "the latest one) when there is none yet"
        },
    )
    follow = Param(
        parse.follow_from_query,
        {"type": "boolean", "default": False},
        default=False,
        metadata={
            "description": "true: a text/event-stream of every event so far, then each new "
            "one as it happens, until the job's end"
        },
    )

    @pre_load
    def follow_alone(self, data, **kwargs):
        parse.check_follow_alone(data, ("limit", "wait"))
        return data


class HeartbeatQuerySchema(Schema):
    wait = Param(
        parse.wait_from_query,
        WAIT_DOC,
        default=0,
        metadata={
            "description": "seconds to wait for a job to start or stop when there is none yet"
        },
    )


class ListWorkersQuerySchema(Schema):
    limit = Param(
        parse.limit_from_query,
        {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_PAGE_SIZE,
            "default": DEFAULT_WORKER_PAGE_SIZE,
        },
        default=DEFAULT_WORKER_PAGE_SIZE,
        metadata={
            "description": f"page size, 1..{MAX_PAGE_SIZE} (default {DEFAULT_WORKER_PAGE_SIZE})"
        },
    )
    cursor = Param(
        parse.worker_cursor_from_query,
        {"type": "string", "minLength": 1},
        metadata={"description": "the next_cursor of the previous page, as it is"},
    )


class DeleteJobsQuerySchema(Schema):
    status = Param(
        parse.delete_statuses_from_query,
        {"type": "string"},
        metadata={
            "description": "terminal, completed, stopped, error (or failed); "
            "absent: the body's job_ids are deleted instead"
        },
    )


class CreateJobSchema(StrictSchema):
    node_id = NodeId(required=True)
    descriptor = JsonObject(
        max_bytes=MAX_DESCRIPTOR_BYTES,
        load_default=dict,
        metadata={
            "description": "any JSON object, stored as given (numbers exactly); at most"
            f" {MAX_DESCRIPTOR_BYTES} bytes as compact JSON (UTF-8, numbers written out as"
            " PostgreSQL writes them back); no U+0000"
        },
    )
    idempotency_key = fields.String(
        load_default=None,
        allow_none=True,
        validate=[validate.Length(1, 256), no_nul],
    )
    # Absent: JOB_MAX_ATTEMPTS. null is not a number of attempts.
    max_attempts = fields.Integer(
        strict=True,
        load_default=lambda: None,
        allow_none=False,
        validate=validate.Range(1, MAX_ATTEMPTS_LIMIT),
        metadata={"description": f"1..{MAX_ATTEMPTS_LIMIT}; default: JOB_MAX_ATTEMPTS"},
    )


class StatusReportSchema(StrictSchema):
    status = fields.String(required=True, validate=validate.OneOf(REPORTABLE_STATUSES))
    detail = JsonObject(
        max_bytes=MAX_DETAIL_BYTES,
        load_default=None,
        allow_none=True,
        metadata={
            "description": f"recorded in the event; at most {MAX_DETAIL_BYTES} bytes as compact"
            " JSON (UTF-8, numbers written out as PostgreSQL writes them back); no U+0000"
        },
    )
    node_id = NodeId(
        load_default=None,
        metadata={
            "description": "with SCHEDULED: the node to move the job to; with any other "
            "status: the reporting worker, which must be the job's (else 409 STALE_ATTEMPT)"
        },
    )
    # Absent: not checked. (A callable default keeps "default": null, which the
    # field does not accept, out of the OpenAPI document.)
    attempt = Attempt(
        load_default=lambda: None,
        metadata={"description": "the attempt reported on; not the job's: 409 STALE_ATTEMPT"},
    )
    # None: not given (a failure is retryable unless the report says otherwise).
    retryable = StrictBoolean(
        load_default=None,
        allow_none=False,
        metadata={
            "description": "only with FAILED: false makes the failure final (no retry)",
            "default": True,
        },
    )

    @validates_schema
    def retryable_only_when_failing(self, data, **kwargs):
        if data.get("retryable") is not None and data["status"] != "FAILED":
            raise ValidationError("is only accepted with status FAILED.", "retryable")


class FileSchema(StrictSchema):
    file_name = fields.String(
        required=True,
        validate=[validate.Length(1, 1024), validate.Predicate("isprintable")],
        metadata={"description": "printable characters only (no control characters)"},
    )
    start_block = fields.Integer(required=True, strict=True, validate=validate.Range(0, MAX_BLOCK))
    end_block = fields.Integer(required=True, strict=True, validate=validate.Range(0, MAX_BLOCK))
    size_bytes = fields.Integer(required=True, strict=True, validate=validate.Range(0, MAX_BLOCK))
    block_hash = fields.String(load_default=None, allow_none=True, validate=FullMatch(HASH_PATTERN))
    prev_hash = fields.String(load_default=None, allow_none=True, validate=FullMatch(HASH_PATTERN))

    @validates_schema
    def blocks_in_order(self, data, **kwargs):
        """end_block must be >= start_block."""
        if data.get("end_block", 0) < data.get("start_block", 0):
            raise ValidationError("must be >= start_block.", "end_block")

    @post_load
    def normalise_hashes(self, data, **kwargs):
        # Hashes compare case-insensitively; store one spelling.
        for key in ("block_hash", "prev_hash"):
            if data[key] is not None:
                data[key] = data[key].lower()
        return data


class FileBatchSchema(StrictSchema):
    """A JSON array of files is loaded as {"files": [...]}; a single object as a batch of one."""

    files = fields.List(
        fields.Nested(FileSchema), required=True, validate=validate.Length(1, MAX_BATCH)
    )

    @pre_load
    def wrap(self, data, **kwargs):
        if isinstance(data, list):
            return {"files": data}
        # Any other object is one file (so a missing file_name is named as such).
        if isinstance(data, dict) and ("file_name" in data or "files" not in data):
            return {"files": [data]}
        return data

    @validates_schema
    def unique_names(self, data, **kwargs):
        """A batch names each file_name at most once."""
        seen = set()
        for file in data.get("files", ()):
            if file["file_name"] in seen:
                raise ValidationError(f"file_name {file['file_name']!r} appears twice.", "files")
            seen.add(file["file_name"])


class RegisterWorkerSchema(StrictSchema):
    info = fields.Nested(WorkerMetadataSchema, load_default=dict)


class BulkDeleteSchema(StrictSchema):
    job_ids = fields.List(JobId(), required=True, validate=validate.Length(0, MAX_BATCH))
