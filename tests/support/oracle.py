"""What the answers must be, written out from the API reference (docs/API.md) rather
than taken from the service's own code (jobs/domain.py, jobs/store/chain.py).

- The status machine: ``STATUSES``, ``ACTIVE``, ``TERMINAL``, ``REPORTABLE``,
  ``WORKER_MOVES``, ``STOPPABLE``, ``LEGAL_MOVES``, ``LEASE_MOVES`` (what a lost
  worker's lease expiry does); ``history_problems`` judges a job's events by it.
- The canonical chain, recomputed from its definition: ``reference_chain`` (its
  files), ``reference_progress`` (its summary), and the shape of one table's
  progress entry, ``expected_progress``.
"""

from __future__ import annotations

from itertools import pairwise

# ---- The job, as the API reference lists its fields (docs/API.md, The job) -----------
# attempt, max_attempts and retry_at: docs/API.md, "Attempts and retries".
JOB_FIELDS = (
    "id",
    "created_at",
    "updated_at",
    "node_id",
    "status",
    "attempt",
    "max_attempts",
    "retry_at",
    "descriptor",
)


# ---- The status machine --------------------------------------------------------------

STATUSES = ("SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING", "COMPLETED", "STOPPED", "FAILED")
ACTIVE = ("SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING")
TERMINAL = ("COMPLETED", "STOPPED", "FAILED")
# Everything a worker may report (PUT /jobs/{id}/status).
REPORTABLE = ("RUNNING", "COMPLETED", "FAILED", "STOPPING", "STOPPED", "SCHEDULED")
# The transition table, row by row: from -> the statuses a worker may report.
WORKER_MOVES = {
    "SCHEDULED": {"RUNNING", "FAILED"},
    "RUNNING": {"COMPLETED", "FAILED"},
    "STOP_REQUESTED": {"FAILED", "STOPPING"},
    "STOPPING": {"FAILED", "STOPPED"},
    "FAILED": {"SCHEDULED"},
    "COMPLETED": set(),
    "STOPPED": set(),
}
# The statuses an operator's stop (PUT|POST /jobs/{id}/stop) moves to STOP_REQUESTED.
STOPPABLE = {"SCHEDULED", "RUNNING"}
# Every legal move (from, to): the workers' and the operators'.
LEGAL_MOVES = {(f, t) for f, tos in WORKER_MOVES.items() for t in tos} | {
    (f, "STOP_REQUESTED") for f in STOPPABLE
}
# The moves a lease expiry makes when the job's registered worker is LOST.
LEASE_MOVES = {("RUNNING", "FAILED"), ("STOP_REQUESTED", "STOPPED"), ("STOPPING", "STOPPED")}


def history_problems(
    job_id: int, status: str, events: list[dict], moves: set = LEGAL_MOVES
) -> list[str]:
    """What keeps ``events`` from being a legal path ending in ``status`` (none: legal).

    A legal path: created SCHEDULED, only ``moves`` (no repeats), ending in
    ``status``, event IDs and timestamps ascending.
    """
    types = [e["event_type"] for e in events]
    if not types:
        return [f"job {job_id} has no events"]
    problems = []
    if types[0] != "SCHEDULED":
        problems.append(f"job {job_id} did not start SCHEDULED: {types}")
    for before, after in pairwise(types):
        if (before, after) not in moves:
            problems.append(f"job {job_id}: illegal {before}->{after}: {types}")
    if types[-1] != status:
        problems.append(f"job {job_id} is {status} but its events end in {types[-1]}: {types}")
    ids = [e["id"] for e in events]
    if ids != sorted(set(ids)):
        problems.append(f"job {job_id}: event ids out of order: {ids}")
    stamps = [e["created_at"] for e in events]
    if stamps != sorted(stamps):
        problems.append(f"job {job_id}: event times out of order: {stamps}")
    return problems


# ---- The canonical chain, recomputed --------------------------------------------------


def expected_progress(start, current, files_count: int, total_size_bytes: int) -> dict:
    """One table's entry of GET /jobs/{id}/progress."""
    return {
        "start_block": start,
        "current_block": current,
        "files_count": files_count,
        "total_size_bytes": total_size_bytes,
    }


def _links(tip: dict, file: dict) -> bool:
    if file["start_block"] != tip["end_block"] + 1:
        return False
    if tip.get("block_hash") is None or file.get("prev_hash") is None:
        return True
    return file["prev_hash"].lower() == tip["block_hash"].lower()


def reference_chain(files: list[dict]) -> list[dict]:
    """The files of one table's canonical chain, in order; ``files`` in registration order.

    Written from the definition alone and built differently from ``chain.walk``:
    the chain grows greedily, each step choosing, among every file that starts
    right after the tip and links to it by hash, the one registered last.
    """
    if not files:
        return []
    lowest = min(f["start_block"] for f in files)
    # Registration order: a higher index is registered later, so it wins a tie.
    first = max(i for i, f in enumerate(files) if f["start_block"] == lowest)
    picked = [files[first]]
    while True:
        tip = picked[-1]
        linking = [i for i, f in enumerate(files) if _links(tip, f)]
        if not linking:
            break
        picked.append(files[max(linking)])
    return picked


def reference_progress(files: list[dict]) -> dict:
    """One table's progress entry; ``files`` is every file in registration order."""
    picked = reference_chain(files)
    if not picked:
        return expected_progress(None, None, 0, 0)
    return expected_progress(
        picked[0]["start_block"],
        picked[-1]["end_block"],
        len(picked),
        sum(f["size_bytes"] for f in picked),
    )
