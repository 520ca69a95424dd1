"""Checks for numeric flags, as Typer callbacks: Click runs them while it parses the command line,
so a bad value is a usage error (one `error:` line, exit 2) before the command body plans, writes
or submits anything.

Click's own `min=` lets NaN through (every comparison with NaN is false) and takes infinity;
`time.sleep(1e300)` raises OverflowError. So seconds are finite and at most a week, and money
is finite and within what the ledger's NUMERIC(18, 6) holds (contract.spec.MAX_MONEY).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import typer

MAX_SECONDS = 7 * 24 * 3600


def _finite(value: float) -> None:
    if not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")


def seconds(*, positive: bool) -> Callable[[Optional[float]], Optional[float]]:
    """Seconds to wait or poll: finite, at most a week; above zero where `positive` (a poll of 0 s spins)."""
    def check(value: Optional[float]) -> Optional[float]:
        if value is None:
            return value
        _finite(value)
        if (value <= 0) if positive else (value < 0):
            raise typer.BadParameter(f"{value:g} must be {'greater than' if positive else 'at least'} 0 seconds")
        if value > MAX_SECONDS:
            raise typer.BadParameter(f"{value:g} is over {MAX_SECONDS} seconds (a week)")
        return value
    return check


def _usd(unit: str, *, positive: bool) -> Callable[[Optional[float]], Optional[float]]:
    def check(value: Optional[float]) -> Optional[float]:
        from contract.spec import MAX_MONEY

        if value is None:
            return value
        _finite(value)
        if value < 0 or (positive and value == 0) or value > MAX_MONEY:
            low = "above 0" if positive else "from 0"
            raise typer.BadParameter(f"{value:g} must be {low} to {MAX_MONEY:,.0f} {unit}")
        return value
    return check


# USD per hour: finite, from 0 to contract.spec.MAX_MONEY.
price_per_hour = _usd("USD per hour", positive=False)
# A budget in USD: finite, above 0 (a budget of 0 stops a job before it starts), at most MAX_MONEY.
budget = _usd("USD", positive=True)


def count(low: int, high: int) -> Callable[[Optional[int]], Optional[int]]:
    """A whole number from `low` to `high` (Click's IntRange, with the same one-line wording as the others)."""
    def check(value: Optional[int]) -> Optional[int]:
        if value is not None and not low <= value <= high:
            raise typer.BadParameter(f"{value} must be from {low} to {high:,}")
        return value
    return check


SQLITE_HEADER = b"SQLite format 3\x00"


def _path_flag(value: str) -> None:
    from contract.files import path_problem, shown

    problem = path_problem(value)
    if problem is not None:
        raise typer.BadParameter(f"{shown(value)} is not a usable path: {problem}")


def state_dir(value: Optional[str]) -> Optional[str]:
    """A directory, or where one can be made: not a path the kernel refuses, not an existing file."""
    import os

    from contract.files import shown

    if value is None:
        return value
    _path_flag(value)
    path = os.path.expanduser(value)
    if os.path.exists(path) and not os.path.isdir(path):
        raise typer.BadParameter(f"{shown(value)} exists and is not a directory")
    return value


def database_url(value: Optional[str]) -> Optional[str]:
    """An SQLite URL must name an SQLite file (or one not made yet): SQLite itself would open a FIFO
    and wait, and would take any other file until the first query fails with a traceback. Other
    URLs are the ledger's to check when it connects."""
    import os
    import stat

    from contract.files import FileInputError, open_regular, shown

    if value is None:
        return value
    if not value.startswith("sqlite:///"):
        return _server_url(value)
    database = value[len("sqlite:///"):].split("?", 1)[0]
    if database in ("", ":memory:"):
        return value
    _path_flag(database)
    try:
        mode = os.stat(database).st_mode
    except FileNotFoundError:
        return value
    except OSError as e:
        raise typer.BadParameter(f"cannot use {shown(database)}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise typer.BadParameter(f"{shown(database)} is not a database file (it is not a regular file)")
    try:
        with open_regular(database, "ledger database") as f:
            head = f.read(len(SQLITE_HEADER))
    except (FileInputError, OSError) as e:
        raise typer.BadParameter(str(e)) from None
    if head and head != SQLITE_HEADER:
        raise typer.BadParameter(f"{shown(database)} is not an SQLite database")
    return value


def _server_url(value: str) -> str:
    """A URL SQLAlchemy can parse, for a database the ledger runs on; the password never echoed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from contract.files import shown

    try:
        url = make_url(value)
    except ArgumentError:  # not echoed: an unparsed URL's password cannot be told from the rest
        raise typer.BadParameter("not a database URL (sqlite:///PATH or postgresql://USER@HOST/DB)") from None
    if url.get_backend_name() not in ("sqlite", "postgresql", "postgres"):
        raise typer.BadParameter(f"{shown(url.render_as_string(hide_password=True))}: the ledger runs on SQLite or PostgreSQL")
    return value
