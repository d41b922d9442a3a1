"""Bounded everywhere (docs/API.md, Operations, Overload and Settings).

- /readyz is cheap and safe to flood: one check at a time per process, its
  result kept a second, and 503 when the settings, the database or its schema
  would keep the service from serving.
- Every setting is checked once, against its range, and a bad one stops the
  start-up naming it (gunicorn's included).
- A full connection pool is 503 SERVICE_BUSY with Retry-After, apart from
  database errors (500 *_ERROR).
- SCRIPT_NAME and X-Forwarded-* count only from FORWARDED_ALLOW_IPS, and no
  header turns a request into a 500.
- A 408 says "Connection: close" and closes.

The gunicorn tests run the production command (helpers.Server) and talk to it
over raw sockets where the exact bytes matter.
"""

from __future__ import annotations

import pytest
from helpers import (
    Server,
    make_app,
)

from jobs import settings

# ---- Settings: each at its bounds, one past them, malformed ------------------------------

# The ranges as docs/API.md states them, written out here rather than read from
# settings.py: (lowest, highest, just below the lowest, just above the highest).
RANGES = {
    "WORKER_LOST_AFTER_S": ("1", "86400", "0.9", "86400.001"),
    "STATEMENT_TIMEOUT_MS": ("100", "300000", "99", "300001"),
    "BULK_DELETE_BUDGET_MS": ("100", "300000", "99", "300001"),
    "BULK_DELETE_BATCH": ("1", "100000", "0", "100001"),
    "BODY_READ_TIMEOUT_S": ("0.1", "300", "0.09", "300.5"),
    "DB_CONNECT_TIMEOUT_S": ("1", "60", "0", "61"),
    "DB_POOL_SIZE": ("1", "100", "0", "101"),
    "DB_POOL_TIMEOUT_S": ("0.1", "30", "0.05", "30.01"),
    "PORT": ("1", "65535", "0", "65536"),
    "WEB_CONCURRENCY": ("1", "64", "0", "65"),
    "WORKER_CONNECTIONS": ("1", "10000", "0", "10001"),
    "KEEPALIVE_S": ("1", "900", "0", "901"),
    "GRACEFUL_TIMEOUT": ("1", "600", "0", "601"),
}

# Not numbers as the settings take them: unicode digits (str.isdigit and float()
# take "٣" and the fullwidth "\uff13"), exponents, signs, underscores, hex, inf/nan, inner spaces.
MALFORMED = [
    "abc",
    "٣",
    "\uff13",
    "1e3",
    "-1",
    "+5",
    "1_000",
    "0x10",
    "inf",
    "nan",
    "1 0",
    "5s",
    "1.2.3",
]


def refusal(environ: dict) -> str:
    with pytest.raises(settings.SettingsError) as refused:
        settings.for_gunicorn(environ)
    return str(refused.value)


def test_unset_or_empty_settings_take_their_defaults():
    unset = settings.for_gunicorn({})
    empty = settings.for_gunicorn({s.name: "  " for s in settings.SETTINGS})
    assert unset == empty
    for setting in settings.SETTINGS:
        assert unset[setting.name] == setting.default, setting.name
    assert unset["FORWARDED_ALLOW_IPS"] == ""  # trust no proxy unless told
    # The service's own reading leaves gunicorn's out.
    assert "PORT" not in settings.from_environment({})
    assert settings.problems(settings.from_environment({})) == []


@pytest.mark.parametrize("name", sorted(RANGES))
def test_each_number_at_its_bounds_and_one_past(name):
    lowest, highest, below, above = RANGES[name]
    rule = settings.BY_NAME[name].rule
    assert f"from {lowest} to {highest}" in rule
    for text in (lowest, highest):
        value = settings.for_gunicorn({name: text})[name]
        assert value == float(text), (name, text)
        assert settings.problems({**settings.from_environment({}), name: value}) == []
    for text in (below, above):
        message = refusal({name: text})
        assert message == f"{name}: {text!r} is out of range: expected {rule}"
        assert f"from {lowest} to {highest}" in message


@pytest.mark.parametrize("name", sorted(RANGES))
def test_malformed_numbers_are_refused_naming_the_variable_and_its_range(name):
    lowest, highest, _, _ = RANGES[name]
    for text in MALFORMED:
        message = refusal({name: text})
        assert message.startswith(f"{name}: {text!r} is not "), message
        assert f"from {lowest} to {highest}" in message, message
    # A whole number is never given with a decimal point.
    if isinstance(settings.BY_NAME[name].default, int):
        assert refusal({name: "5.0"}).startswith(f"{name}: '5.0' is not a whole number")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STATEMENT_TIMEOUT_MS", "2147483648"),  # every route answered 500
        ("WORKER_LOST_AFTER_S", "1e12"),  # /workers answered 500
        ("BULK_DELETE_BUDGET_MS", "4294967296"),  # the bulk delete answered 500
        ("DB_CONNECT_TIMEOUT_S", "99999999999"),  # every route answered 500
        ("WORKER_LOST_AFTER_S", "abc"),  # failed without naming the variable
        ("DB_POOL_SIZE", "9" * 5000),  # more digits than int() converts
    ],
)
def test_values_that_broke_the_service_stop_the_start_up(name, value, monkeypatch, database_url):
    message = refusal({name: value})
    assert message.startswith(f"{name}: ") and settings.BY_NAME[name].rule in message
    assert len(message) < 300  # the value is shown cut short
    # create_app reads the environment the same way.
    monkeypatch.setenv(name, value)
    with pytest.raises(settings.SettingsError, match=f"^{name}: "):
        make_app(database_url)


def test_every_bad_setting_is_named_at_once():
    message = refusal(
        {
            "STATEMENT_TIMEOUT_MS": "0",
            "KEEPALIVE_S": "٣",
            "LOG_LEVEL": "loud",
            "JOB_RETENTION": "5x",
        }
    )
    named = [line.split(":", 1)[0] for line in message.splitlines()]
    assert sorted(named) == ["JOB_RETENTION", "KEEPALIVE_S", "LOG_LEVEL", "STATEMENT_TIMEOUT_MS"]


def test_levels_and_proxy_addresses():
    read = settings.for_gunicorn
    assert read({"LOG_LEVEL": "warning"})["LOG_LEVEL"] == "WARNING"
    assert read({"GUNICORN_LOG_LEVEL": "DEBUG"})["GUNICORN_LOG_LEVEL"] == "debug"
    for name in ("LOG_LEVEL", "GUNICORN_LOG_LEVEL"):
        assert refusal({name: "loud"}).startswith(f"{name}: 'loud' is not allowed: expected one of")
    addresses = read({"FORWARDED_ALLOW_IPS": "10.0.0.5, 10.1.0.0/16,::1"})
    assert addresses["FORWARDED_ALLOW_IPS"] == "10.0.0.5,10.1.0.0/16,::1"
    assert read({"FORWARDED_ALLOW_IPS": "*"})["FORWARDED_ALLOW_IPS"] == "*"
    # Host bits set (a mistake gunicorn refuses too), a name, an empty item.
    for bad in ("10.1.0.1/16", "proxy.internal", "10.0.0.5,,10.0.0.6", "256.0.0.1"):
        assert refusal({"FORWARDED_ALLOW_IPS": bad}).startswith("FORWARDED_ALLOW_IPS: ")


def test_secrets_are_checked_but_never_repeated():
    for name, value in [
        ("ADMIN_TOKEN", "hunter2 with spaces"),
        ("WORKER_TOKEN", "hunter2-ünicode"),
        ("ADMIN_TOKEN", "hunter2" + "x" * 5000),
        ("DATABASE_URL", "host=db password=hunter2 port"),
    ]:
        message = refusal({name: value})
        assert message.startswith(f"{name}: not allowed (the value is not shown): expected ")
        assert "hunter2" not in message
    assert settings.for_gunicorn({"ADMIN_TOKEN": "adm-7f3c~!"})["ADMIN_TOKEN"] == "adm-7f3c~!"


def test_job_retention_range():
    assert settings.for_gunicorn({"JOB_RETENTION": "36500d"})["JOB_RETENTION"].days == 36500
    assert refusal({"JOB_RETENTION": "36501d"}).startswith(
        "JOB_RETENTION: '36501d' is out of range"
    )
    assert refusal({"JOB_RETENTION": "0s"}).startswith("JOB_RETENTION: '0s' is out of range")


def test_gunicorn_refuses_to_start_with_a_bad_value(_schema):
    instance = Server(
        _schema, env={"WORKER_LOST_AFTER_S": "abc", "WEB_CONCURRENCY": "٣", "KEEPALIVE_S": "0"}
    ).launch()
    try:
        assert instance.process.wait(30) != 0
        log = instance.log()
    finally:
        instance.stop()
        instance.cleanup()
    assert "WORKER_LOST_AFTER_S: 'abc' is not a number of seconds" in log, log
    assert "from 1 to 86400" in log, log
    assert "WEB_CONCURRENCY: '٣' is not a whole number" in log, log
    assert (
        "KEEPALIVE_S: '0' is out of range: expected a whole number of seconds from 1 to 900" in log
    )
    assert "Booting worker" not in log, "refused before any worker was forked"
    assert "Traceback" not in log, log
