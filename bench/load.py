"""The load drivers and their parsing: wrk, single-client probes, pgbench.

wrk runs one thread (the servers under test need the cores more than it
does) and, with load.lua, draws ids from a range and can stop after a count
of responses. A single-client probe sends one request at a time, so its p50
has no queueing in it. pgbench replays captured SQL (see plans.py).
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.console import say

LOAD_LUA = Path(__file__).resolve().parent / "load.lua"


def ensure_wrk() -> None:
    """wrk comes from Debian's packages; install it on first use."""
    if shutil.which("wrk"):
        return
    say("wrk is missing: installing it with apt-get")
    if subprocess.run(["apt-get", "install", "-y", "-q", "wrk"]).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True)


@dataclass
class Load:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx responses plus socket errors


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _wrk_ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([a-z]+)", text).groups()
    return float(number) * _UNITS_MS[unit]


def parse_wrk(output: str) -> Load:
    def find(pattern: str) -> re.Match:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"unexpected wrk output:\n{output}")
        return match

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return Load(
        requests=int(find(r"^\s*(\d+) requests in")[1]),
        rps=float(find(r"^Requests/sec:\s+([\d.]+)")[1]),
        p50_ms=_wrk_ms(find(r"^\s+50%\s+(\S+)")[1]),
        p99_ms=_wrk_ms(find(r"^\s+99%\s+(\S+)")[1]),
        errors=(int(non_2xx[1]) if non_2xx else 0)
        + (sum(map(int, sockets.groups())) if sockets else 0),
    )


def wrk_argv(
    url: str, seconds: int, connections: int, script_args: list[str] | None = None
) -> list[str]:
    # One thread: the servers under test need the cores more than wrk does.
    argv = ["wrk", "--latency", "-t1", f"-c{connections}", f"-d{seconds}s", url]
    if script_args is not None:
        argv[1:1] = ["-s", str(LOAD_LUA)]
        argv += ["--", *script_args]
    return argv


def id_script(ids: range, *paths: str, stop_after: int = 0, marker: str = "-") -> list[str]:
    """load.lua's arguments: ``paths`` in turn, each {id} drawn from ``ids``."""
    return [str(stop_after), marker, str(ids.start), str(ids[-1]), str(ids.step), *paths]


def run_wrk(url: str, seconds: int, connections: int, script_args: list[str] | None = None) -> Load:
    done = subprocess.run(
        wrk_argv(url, seconds, connections, script_args), capture_output=True, text=True, check=True
    )
    return parse_wrk(done.stdout)


def run_wrk_until(
    url: str, connections: int, script_args: list[str], marker: Path, seconds: int = 3600
) -> Load:
    """Run wrk until load.lua creates ``marker`` (its STOP_AFTER count) or ``seconds``."""
    marker.unlink(missing_ok=True)
    wrk = subprocess.Popen(
        wrk_argv(url, seconds, connections, script_args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not marker.exists() and wrk.poll() is None:
        time.sleep(0.05)
    return interrupt_wrk(wrk)


def load_during(
    url: str,
    connections: int,
    script_args: list[str],
    action: Callable[[], object],
    warmup_s: int = 2,
) -> Load:
    """What wrk sees while ``action()`` runs (after a warm-up run of its own)."""
    run_wrk(url, warmup_s, connections, script_args)
    wrk = subprocess.Popen(
        wrk_argv(url, 3600, connections, script_args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.2)  # let wrk connect before the action starts
        action()
    finally:
        load = interrupt_wrk(wrk)
    return load


def interrupt_wrk(wrk: subprocess.Popen) -> Load:
    """Stop a running wrk the way Ctrl-C does: it still prints its statistics."""
    if wrk.poll() is None:
        wrk.send_signal(signal.SIGINT)
    out, err = wrk.communicate(timeout=30)
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed ({wrk.returncode}): {err}")
    return parse_wrk(out)


@dataclass
class Probe:
    p50_ms: float
    samples: int
    bad: dict[int, int] = field(default_factory=dict)  # unexpected status -> count


SINGLE_CLIENT_REQUESTS = 200


def single_client(
    port: int,
    path: str | list[str],
    max_requests: int = SINGLE_CLIENT_REQUESTS,
    max_seconds: float = 5.0,
    warmup: int = 5,
) -> Probe:
    """Latency one client sees, one request at a time (no queueing behind others).

    Capped in time as well as count, so a slow floor (the naive app reading a
    whole table per request) still finishes with a few dozen samples. A list
    of paths is requested in turn (e.g. jobs spread over a table).
    """
    paths = [path] if isinstance(path, str) else path
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    timings, bad = [], {}
    deadline = time.monotonic() + max_seconds
    for i in range(warmup + max_requests):
        started = time.perf_counter()
        # A server may close the connection after a response (keep-alive
        # runs out); http.client reconnects by itself, and the connect is
        # part of what a client pays.
        conn.request("GET", paths[i % len(paths)])
        response = conn.getresponse()
        response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            bad[response.status] = bad.get(response.status, 0) + 1
        if i >= warmup:
            timings.append(elapsed)
            if time.monotonic() > deadline:
                break
    conn.close()
    return Probe(statistics.median(timings) * 1000, len(timings), bad)


def request(port: int, method: str, path: str, body=None) -> tuple[int, float]:
    """One request; returns its status and duration in seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    started = time.perf_counter()
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    response = conn.getresponse()
    response.read()
    elapsed = time.perf_counter() - started
    conn.close()
    return response.status, elapsed


def get_json(port: int, path: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return payload


def pgbench(
    url: str,
    statements: list[str],
    seconds: int,
    connections: int,
    workdir: Path,
    prepared: bool = False,
) -> float:
    """Transactions per second of ``statements`` run back to back, as a script.

    ``prepared``: each statement is prepared once per connection, as the
    service does (-M prepared), rather than sent as text every time.
    """
    from dev import postgres as devdb

    script = workdir / "pgbench.sql"
    script.write_text("".join(s.strip().rstrip(";") + ";\n" for s in statements))
    done = subprocess.run(
        [
            str(devdb.bin_dir() / "pgbench"),
            "-n",
            "-Mprepared" if prepared else "-Msimple",
            f"-c{connections}",
            "-j1",
            f"-T{seconds}",
            "-f",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(re.search(r"tps = ([\d.]+)", done.stdout)[1])
