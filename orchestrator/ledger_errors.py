"""The ledger's errors, each one line: a database that cannot be read or written (a full disk, a
read-only file, a server that is down, a file that is no database) says so, naming the ledger, from
every query and commit, instead of a SQLAlchemy traceback.

Running jobs keep their records in their run directories, so nothing is lost while the ledger
cannot be written: the next command that syncs them (`spotune status`) brings it up to date.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, IntegrityError

from contract.errors import UserError

_DISK_WORDS = ("full", "readonly", "read-only", "disk i/o", "quota")


class LedgerError(UserError):
    """The ledger cannot be opened or a job cannot be found; one line for the user."""


class OneLineErrors:
    def __init__(self, display_url: str, sqlite_database: Optional[str]):
        self.display_url = display_url
        self.sqlite_database = sqlite_database if sqlite_database not in (None, "", ":memory:") else None
        self.opened = False  # set once migrated: "cannot open" before, "cannot use" after

    def install(self, engine) -> None:
        @event.listens_for(engine, "handle_error")
        def _one_line(context):
            error = context.sqlalchemy_exception
            if context.is_pre_ping or isinstance(error, IntegrityError) or not isinstance(error, DBAPIError):
                return  # pre-ping must see a disconnect; an id collision is retried by create_job
            raise self.error(error)

    def error(self, error: DBAPIError) -> LedgerError:
        message = (str(getattr(error, "orig", None) or error).strip().splitlines() or ["database error"])[0]
        disk = self.disk_trouble()
        if disk is not None:
            message = f"{message} ({disk})"  # SQLite's "unable to open database file" says too little
        hint = ""
        if disk or any(word in message.lower() for word in _DISK_WORDS):
            hint = ("; running jobs keep their records in their run directories: once the ledger can be "
                    "written, `spotune status` brings it up to date")
        verb = "use the ledger at" if self.opened else "open ledger at"
        return LedgerError(f"cannot {verb} {self.display_url}: {message}{hint}")

    def disk_trouble(self) -> Optional[str]:
        """Why a SQLite ledger's directory cannot take writes, when its file system says so."""
        if self.sqlite_database is None:
            return None
        try:
            stats = os.statvfs(Path(self.sqlite_database).expanduser().parent)
        except OSError:
            return None
        if stats.f_flag & os.ST_RDONLY:
            return "its file system is read-only"
        return "its disk is full" if stats.f_bavail == 0 else None
