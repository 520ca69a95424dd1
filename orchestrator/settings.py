"""Where state lives: the flag, then the environment, then the nearest `state/` that holds a
ledger (walking up from the working directory, the way git finds `.git`), then `./state`.

Reading never creates anything: commands that only read open the ledger with `existing_ledger()`,
and every command says which ledger it read (`ledger_label()`), so a job launched from another
folder is never silently invisible.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from orchestrator.ledger import Ledger

STATE_DIR_NAME = "state"
LEDGER_FILE = "ledger.db"


def find_state_dir(start: Optional[Path] = None) -> Optional[Path]:
    """The nearest `<dir>/state` holding a ledger.db, from `start` (default: the working directory) up
    to the filesystem root; None when there is none."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / STATE_DIR_NAME
        if (candidate / LEDGER_FILE).is_file():
            return candidate
    return None


def state_dir(flag: Optional[str] = None) -> Path:
    if flag or os.environ.get("SPOTUNE_STATE_DIR"):
        return Path(flag or os.environ["SPOTUNE_STATE_DIR"]).expanduser()
    found = find_state_dir()
    if found is None or found == (Path.cwd() / STATE_DIR_NAME).resolve():
        return Path(STATE_DIR_NAME)
    return found


def db_url(flag: Optional[str] = None, state: Optional[Path] = None) -> str:
    url = flag or os.environ.get("SPOTUNE_DB")
    if url:
        return url
    return f"sqlite:///{(state or state_dir()).resolve() / LEDGER_FILE}"


def _sqlite_file(url: str) -> Optional[Path]:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


@dataclass(frozen=True)
class GlobalOptions:
    """The CLI's global options (`spotune --state-dir DIR --db URL COMMAND`), as given: None where left
    out. The root command puts one on Typer's context (`ctx.obj`); a command takes a
    `ctx: typer.Context` parameter and reads it back with `global_options(ctx)`."""

    state_dir: Optional[str] = None
    db: Optional[str] = None

    def state_path(self) -> Path:
        return state_dir(self.state_dir)

    def db_url(self) -> str:
        return db_url(self.db, self.state_path())

    def ledger_label(self) -> str:
        """Which ledger, in one phrase: `ledger state/ledger.db` (found walking up: the full path), or the
        database URL without its password."""
        url = self.db_url()
        path = _sqlite_file(url)
        if path is None:
            from orchestrator.redact import redact

            try:
                from sqlalchemy.engine import make_url

                return f"ledger {make_url(url).render_as_string(hide_password=True)}"
            except Exception:  # not a URL: the ledger itself says so when opened
                return f"ledger {redact(url)}"
        chosen = self.state_dir or self.db or os.environ.get("SPOTUNE_STATE_DIR") or os.environ.get("SPOTUNE_DB")
        here = (Path.cwd() / STATE_DIR_NAME / LEDGER_FILE).resolve()
        where = "" if chosen or path.resolve() == here else " (found walking up)"
        try:
            shown = path.resolve().relative_to(Path.cwd().resolve())
        except ValueError:
            shown = path
        return f"ledger {shown}{where}"

    def ledger(self) -> "Ledger":
        """The ledger, created (with its SQLite file) where it does not exist yet: for commands that record."""
        from orchestrator.ledger import Ledger

        return Ledger(self.db_url())

    def existing_ledger(self) -> "Optional[Ledger]":
        """The ledger, or None when the default SQLite file does not exist yet (reading creates nothing)."""
        path = _sqlite_file(self.db_url())
        if path is not None and not path.exists():
            return None
        return self.ledger()


def global_options(ctx=None) -> GlobalOptions:
    """The global options on a command's Typer context (`ctx: typer.Context`); defaults without one."""
    found = ctx.find_object(GlobalOptions) if ctx is not None else None
    return found if found is not None else GlobalOptions()
