"""The SQL that the apps run, captured from the server with its executed plans.

While a capture is on, the server logs every statement and auto_explain logs
the plan of every execution with its actual rows, timing and buffers
(EXPLAIN (ANALYZE, BUFFERS) of the very run, generic plans of prepared
statements included), read back through pg_read_file. An EXECUTE of a
prepared statement is turned back into its PREPARE'd body with the
arguments in place of $1, $2, ..., so that pgbench can replay it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Captured:
    """One statement another session ran: as sent, as pgbench can replay it, its plans."""

    sent: str
    replay: str
    prepared: bool
    plan_json: dict | None = None
    plan_text: str = ""

    def shown(self) -> str:
        if not self.prepared:
            return self.sent.strip()
        return f"{self.sent.strip()}\n-- which runs:\n{self.replay.strip()}"


class Plans:
    """The SQL that other sessions run during an action, and its plans.

    auto_explain is preloaded but off (log_min_duration = -1); a capture
    turns it and log_statement on with a configuration reload, which every
    idle backend applies before its next statement, so the apps keep their
    connections. An action is captured twice, once per plan format.
    """

    ENTRY = re.compile(r"^\S+ \S+ \S+ \[(\d+)\] (LOG|DETAIL):  (.*)$")

    def __init__(self, conn):
        self.conn = conn
        with conn.cursor() as cur:
            cur.execute("SELECT pg_current_logfile()")
            self.logfile = cur.fetchone()[0]
        if self.logfile is None:
            raise RuntimeError("the server has no log file (logging_collector is off)")

    def _log_size(self) -> int:
        with self.conn.cursor() as cur:
            cur.execute("SELECT size FROM pg_stat_file(%s)", (self.logfile,))
            return cur.fetchone()[0]

    def _set_logging(self, on: bool, plan_format: str = "json") -> None:
        with self.conn.cursor() as cur:
            cur.execute("ALTER SYSTEM SET auto_explain.log_min_duration = %s", (0 if on else -1,))
            cur.execute("ALTER SYSTEM SET auto_explain.log_format = %s", (plan_format,))
            cur.execute("ALTER SYSTEM SET log_statement = %s", ("all" if on else "none",))
            cur.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)  # backends take the reload between statements

    def _read(self, action: Callable[[], object], plan_format: str) -> list[tuple[str, str]]:
        """(kind, text) of each log entry of the other sessions during ``action()``."""
        self._set_logging(True, plan_format)
        start = self._log_size()
        try:
            action()
        finally:
            self._set_logging(False)
        # The collector writes asynchronously: wait until the log stops growing.
        end = self._log_size()
        while True:
            time.sleep(0.2)
            size = self._log_size()
            if size == end:
                break
            end = size
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_read_file(%s, %s, %s)", (self.logfile, start, end - start))
            text = cur.fetchone()[0]
        ours = self.conn.get_backend_pid()
        entries, lines = [], text.splitlines()
        for i, line in enumerate(lines):
            match = self.ENTRY.match(line)
            if not match or int(match[1]) == ours:
                continue
            # An entry continues on the following lines, each indented by one tab.
            body = [match[3]]
            for following in lines[i + 1 :]:
                if not following.startswith("\t"):
                    break
                body.append(following[1:])
            entries.append((match[2], "\n".join(body)))
        return entries

    def capture(self, action: Callable[[], object]) -> list[Captured]:
        """The statements of ``action()`` (run twice) with their executed plans."""
        captured: list[Captured] = []
        for kind, text in self._read(action, "json"):
            if kind == "LOG" and text.startswith("statement: "):
                sent = text.removeprefix("statement: ")
                captured.append(Captured(sent, sent, prepared=False))
            elif kind == "DETAIL" and text.startswith("prepare: ") and captured:
                last = captured[-1]
                last.replay = replay_execute(last.sent, text.removeprefix("prepare: "))
                last.prepared = True
            elif kind == "LOG" and text.startswith("duration: "):
                plan = json.loads(text.split("\n", 1)[1])
                executed = [c for c in captured if c.plan_json is None]
                if executed:
                    executed[-1].plan_json = plan["Plan"]
        plans = [
            plan_tree(text)
            for kind, text in self._read(action, "text")
            if kind == "LOG" and text.startswith("duration: ")
        ]
        with_plans = [c for c in captured if c.plan_json is not None]
        for entry, plan in zip(with_plans, plans, strict=False):
            entry.plan_text = plan
        return with_plans


def plan_tree(entry: str) -> str:
    """The plan of a text-format auto_explain entry, without its Query Text."""
    lines = entry.splitlines()
    root = next(i for i, line in enumerate(lines) if i and re.match(r"^\S.*\(cost=", line))
    return "\n".join(lines[root:])


def split_arguments(text: str) -> list[str]:
    """Top-level comma-separated SQL expressions (commas in quotes or brackets stay)."""
    parts, depth, quoted, current = [], 0, False, []
    for char in text:
        if quoted:
            quoted = char != "'"
        elif char == "'":
            quoted = True
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


def replay_execute(execute: str, prepare: str) -> str:
    """``EXECUTE name (args)`` as plain SQL: the PREPARE'd body with each $n replaced."""
    args = split_arguments(execute.strip().rstrip(";").split("(", 1)[1].rsplit(")", 1)[0])
    header = re.match(r"PREPARE\s+\w+\s*(\(([^)]*)\))?\s+AS\s+", prepare, re.IGNORECASE)
    types = split_arguments(header[2]) if header[2] else []
    body = prepare[header.end() :]
    for n in range(len(args), 0, -1):  # $10 before $1
        cast = f"::{types[n - 1]}" if n <= len(types) else ""
        body = re.sub(rf"\${n}(?!\d)", f"({args[n - 1]}){cast}", body)
    return body


def jobs_rows_read(plan: dict) -> int:
    """Rows of ``jobs`` a plan looked at: returned by its scans or filtered out by them.

    A plan that walks an index across the table filtering nearly everything
    out reads the whole table as surely as a Seq Scan does, and shows up here.
    """

    def nodes(node):
        yield node
        for child in node.get("Plans", []):
            yield from nodes(child)

    return round(
        sum(
            (
                n["Actual Rows"]
                + n.get("Rows Removed by Filter", 0)
                + n.get("Rows Removed by Index Recheck", 0)
            )
            * n["Actual Loops"]
            for n in nodes(plan)
            if n.get("Relation Name") == "jobs"
        )
    )
