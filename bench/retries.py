"""Retries and fencing on the 1M-job mixed table: what the retry sweep costs, and
what naming the worker and attempt costs a status report.

- retry_sweep_ms: the retry sweep's statement (store/workers.RETRY_DUE, run as
  the chore runs it, in a transaction of its own, timed from this process
  with its commit) retrying 500 due jobs, and finding nothing due while
  50,000 jobs wait for retries an hour away; the median of SWEEP_RUNS each.
  Also reported: 500 due jobs half of which belong to LOST workers and go to
  the least loaded of 32 ALIVE ones (the placement counts those workers'
  active jobs, ~2,300 each).
  EXPLAIN ANALYZE of one sweep of each kind splits planning from execution.
- report_fenced_vs_plain: wrk throughput of PUT /jobs/{id}/status reporting
  RUNNING again on RUNNING jobs (the whole guard statement, no write), with
  "node_id" and "attempt" over without; the two alternate (ABBA), four runs
  each, and each side's median is compared. About 1.0 is expected: the fence is two
  comparisons in the statement that locks the row anyway.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.console import say
from bench.load import Load, parse_wrk
from bench.servers import connect
from jobs.domain import ACTIVE_STATUSES
from jobs.store import workers as worker_store

if TYPE_CHECKING:
    from bench.context import Bench

REPORT_LUA = Path(__file__).resolve().parent / "report.lua"
SWEEP_BATCH = 500
SWEEP_RUNS = 5
IDLE_RUNS = 20
WAITING = 50_000
REPORT_JOBS = 5_000
REPORT_ROUNDS = 4
LOST_AFTER_S = 30
ACTIVE = list(ACTIVE_STATUSES)


@dataclass
class RetryFigures:
    due_ms: float | None = None  # one sweep retrying SWEEP_BATCH due jobs
    idle_ms: float | None = None  # one sweep with nothing due
    placement_ms: float | None = None  # SWEEP_BATCH due, half of LOST workers
    # EXPLAIN ANALYZE of one sweep each: (planning ms, execution ms)
    explained: dict[str, tuple[float, float]] = field(default_factory=dict)
    failed_jobs: int = 0
    waiting: int = 0
    reports: dict[str, list[Load]] = field(default_factory=dict)  # plain/fenced -> runs

    def rps(self, kind: str) -> float | None:
        runs = self.reports.get(kind)
        return statistics.median(load.rps for load in runs) if runs else None

    @property
    def fenced_vs_plain(self) -> float | None:
        plain, fenced = self.rps("plain"), self.rps("fenced")
        return None if not plain or fenced is None else fenced / plain


def timed_sweep(conn) -> tuple[float, int]:
    """One sweep as the chore runs it: (milliseconds including the commit, jobs retried)."""
    started = time.perf_counter()
    with conn, conn.cursor() as cur:
        retried = worker_store.retry_due(cur, LOST_AFTER_S, SWEEP_BATCH)
    return (time.perf_counter() - started) * 1000, retried.retried


def explained_sweep(conn) -> tuple[float, float]:
    """One sweep under EXPLAIN ANALYZE (it runs, and commits): planning and execution ms."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + worker_store.RETRY_DUE,
            {"lost_after_s": LOST_AFTER_S, "batch": SWEEP_BATCH, "active": ACTIVE},
        )
        plan = cur.fetchone()[0][0]
    return plan["Planning Time"], plan["Execution Time"]


def make_due(conn, count: int) -> None:
    """``count`` failed jobs not yet waiting become due (max_attempts 3, retry_at passed)."""
    with conn, conn.cursor() as cur:
        cur.execute(
            """
            UPDATE jobs SET max_attempts = 3, retry_at = now() - interval '1 second'
            WHERE id IN (SELECT id FROM jobs WHERE status = 'FAILED' AND retry_at IS NULL
                         ORDER BY id DESC LIMIT %s)
            """,
            (count,),
        )


def sweeps(bench: Bench, figures: RetryFigures) -> None:
    conn = connect(bench.pg.url)
    conn.autocommit = False
    try:
        with conn, conn.cursor() as cur:
            cur.execute("DELETE FROM workers")
            cur.execute("SELECT count(*) FROM jobs WHERE status = 'FAILED'")
            figures.failed_jobs = cur.fetchone()[0]
            # Jobs waiting for retries an hour away: in the sweep's index, never due.
            cur.execute(
                """
                UPDATE jobs SET max_attempts = 3, retry_at = now() + interval '1 hour'
                WHERE id IN (SELECT id FROM jobs WHERE status = 'FAILED' ORDER BY id LIMIT %s)
                """,
                (WAITING,),
            )
            figures.waiting = cur.rowcount
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("VACUUM ANALYZE jobs")
        conn.autocommit = False
        idle = []
        for _ in range(IDLE_RUNS):
            ms, retried = timed_sweep(conn)
            assert retried == 0, retried
            idle.append(ms)
        figures.idle_ms = statistics.median(idle)
        figures.explained["none due"] = explained_sweep(conn)
        due = []
        for _ in range(SWEEP_RUNS):
            make_due(conn, SWEEP_BATCH)
            ms, retried = timed_sweep(conn)
            assert retried == SWEEP_BATCH, retried
            due.append(ms)
        figures.due_ms = statistics.median(due)
        make_due(conn, SWEEP_BATCH)
        figures.explained[f"{SWEEP_BATCH} due"] = explained_sweep(conn)
        # Placement: workers 00-31 LOST, 32-63 ALIVE; the due jobs' nodes are
        # worker-00..63, so about half of them move.
        with conn, conn.cursor() as cur:
            cur.execute(
                """
                INSERT INTO workers (node_id, created_at, registered_at, heartbeat_at)
                SELECT 'worker-' || lpad(n::text, 2, '0'), now(), now(),
                       CASE WHEN n < 32 THEN now() - interval '1 hour' ELSE now() END
                FROM generate_series(0, 63) n
                """
            )
        placed = []
        for _ in range(SWEEP_RUNS):
            make_due(conn, SWEEP_BATCH)
            ms, retried = timed_sweep(conn)
            assert retried == SWEEP_BATCH, retried
            placed.append(ms)
        figures.placement_ms = statistics.median(placed)
        make_due(conn, SWEEP_BATCH)
        figures.explained[f"{SWEEP_BATCH} due, placed"] = explained_sweep(conn)
        # The service's own lease sweep must not expire anything during the reports.
        with conn, conn.cursor() as cur:
            cur.execute("DELETE FROM workers")
    finally:
        conn.close()
    say(
        f"retry sweep: {figures.due_ms:.2f} ms for {SWEEP_BATCH} due,"
        f" {figures.idle_ms:.2f} ms with none due ({figures.waiting:,} waiting),"
        f" {figures.placement_ms:.2f} ms with placement"
    )


def reports(bench: Bench, figures: RetryFigures) -> None:
    if bench.service is None:
        return
    conn = connect(bench.pg.url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT id, node_id, attempt FROM jobs WHERE status = 'RUNNING'"
                " ORDER BY id LIMIT %s",
                (REPORT_JOBS,),
            )
            rows = cur.fetchall()
    finally:
        conn.close()
    jobs_file = bench.workdir / "report-jobs.txt"
    jobs_file.write_text("".join(f"{i} {node} {attempt}\n" for i, node, attempt in rows))
    url = bench.service.url + "/"
    seconds, connections = bench.args.duration, bench.args.connections

    def wrk(fenced: bool, duration: int) -> Load:
        argv = [
            "wrk", "--latency", "-t1", f"-c{connections}", f"-d{duration}s",
            "-s", str(REPORT_LUA), url, "--", str(jobs_file), "1" if fenced else "0",
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        return parse_wrk(done.stdout)

    wrk(False, min(2, seconds))  # warm-up
    wrk(True, min(2, seconds))
    # ABBA order, REPORT_ROUNDS times each: a drift of the shared box's load
    # over the runs falls on both sides alike.
    for round_ in range(REPORT_ROUNDS):
        for kind in ("plain", "fenced") if round_ % 2 == 0 else ("fenced", "plain"):
            load = wrk(kind == "fenced", seconds)
            figures.reports.setdefault(kind, []).append(load)
            if load.errors:
                bench.notes.append(f"{load.errors} status reports ({kind}) were not answered 2xx.")
            say(
                f"report {kind:6} {load.rps:8.0f} req/s  p50 {load.p50_ms:.2f} ms"
                f"  p99 {load.p99_ms:.2f} ms  errors {load.errors}"
            )
    say(f"report_fenced_vs_plain {figures.fenced_vs_plain:.3f}")


def run_retries(bench: Bench) -> RetryFigures:
    """Both measurements, on the mixed table as seeded (it is changed: run it last on it)."""
    figures = RetryFigures()
    sweeps(bench, figures)
    reports(bench, figures)
    return figures


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def section(figures: RetryFigures | None) -> tuple[list[str], dict[str, str]]:
    """The report's section and the summary's two entries."""
    if figures is None:
        return [], {"retry_sweep_ms": "n/a", "report_fenced_vs_plain": "n/a"}
    rows = [
        f"| one sweep retrying {SWEEP_BATCH} due jobs (they stay on their nodes)"
        f" | {fmt(figures.due_ms)} ms |",
        f"| one sweep finding nothing due ({figures.waiting:,} jobs waiting, an hour away;"
        f" {figures.failed_jobs:,} FAILED) | {fmt(figures.idle_ms)} ms |",
        f"| one sweep retrying {SWEEP_BATCH} due jobs, half of LOST workers, placed on"
        f" 32 ALIVE | {fmt(figures.placement_ms)} ms |",
    ]
    for kind in ("plain", "fenced"):
        runs = figures.reports.get(kind, [])
        if runs:
            rows.append(
                f"| PUT /jobs/{{id}}/status {kind} (RUNNING again), req/s per run"
                f" | {', '.join(f'{load.rps:.0f}' for load in runs)} |"
            )
    rows.append(f"| fenced / plain throughput | {fmt(figures.fenced_vs_plain, 3)} |")
    rows += [
        f"| EXPLAIN ANALYZE of one sweep, {what}: planning / execution"
        f" | {planning:.2f} / {execution:.2f} ms |"
        for what, (planning, execution) in figures.explained.items()
    ]
    lines = [
        "",
        "## Retries and fencing (the mixed table)",
        "",
        "| measurement | value |",
        "|---|---|",
        *rows,
    ]
    summary = {
        "retry_sweep_ms": f"{fmt(figures.due_ms)}/{fmt(figures.idle_ms)}",
        "report_fenced_vs_plain": fmt(figures.fenced_vs_plain, 3),
    }
    return lines, summary
