"""What the tests share, beside conftest.py's fixtures, one module per concern.

Test modules import from here (``from support.oracle import LEGAL_MOVES``)
and never from each other:

- ``support.oracle``: what the answers must be, written out from docs/API.md
  (the status machine, the canonical chain recomputed).
- ``support.databases``: the session's database emptied, databases of a
  test's own, databases that fail on purpose, holding one from outside.
- ``support.service``: apps, requests through a ``Call`` (the same over the
  Flask test client and over HTTP), bodies, the error shape, metrics.
- ``support.checked``: calls that check the documented shapes of their answers
  (``create``, ``report``, ``list_jobs``...), and jobs driven to a status
  through legal moves only (``drive``, ``make_job``).
- ``support.refusals``: refused requests and the proof that they changed no row
  (``send``, ``refused``, ``unchanged``, ``db_rows``), bad IDs, and the jobs the
  refusals are aimed at, built once (``built_world``, ``built_targets``).
- ``support.races``: racing requests, the audit trail, the race workloads and
  the checks of what they saw.
- ``support.waiting``: waiting requests in the background, follow streams,
  many waiters on raw sockets, ``until`` (poll a condition).
- ``support.retrying``: attempts, fencing and automatic retries (workers'
  leases, fenced reports, retries made due).
- ``support.replication``: a primary and a hot standby on this box.
- ``support.browser``: a real browser for the console's tests (a pytest plugin
  of test_console.py).

The real service under gunicorn is ``dev.gunicorn`` (``Server``, ``serving``,
``http_caller``), shared with the benchmarks.
"""
