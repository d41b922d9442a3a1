"""Every SQL statement of the service, one function per statement.

Each function runs its statement on the caller's cursor (most often on the
request's connection, db.get_db) and returns a named result or an outcome
type (outcomes.py): NotFound, Moved, Refused(status), ... never a bare tuple
for the caller to unpack by position. sql.py runs them (plain or Prepared);
session.py holds the statements about the connection itself (pool.py's
session set-up and time limits, init-db's lock, the replicas' WAL positions).
Of the service's SQL only schema.sql, applied whole by db.apply_schema, is
elsewhere.
Every state guard is one conditional statement (or one CTE) that also writes
its event, so a racing request can never slip in between a check and a write.

PostgreSQL renders the JSON of the reads (a job's JSON is rendered when the
row is written: jobs.job_json, see schema.sql), so hot paths run no per-row
Python; the tests hold those bytes to the marshmallow schemas.
"""
