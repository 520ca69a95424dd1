"""Where state lives: flag, then environment, then the default."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from orchestrator.ledger import Ledger


def state_dir(flag: Optional[str] = None) -> Path:
    return Path(flag or os.environ.get("SPOTUNE_STATE_DIR") or "state").expanduser()


def db_url(flag: Optional[str] = None, state: Optional[Path] = None) -> str:
    url = flag or os.environ.get("SPOTUNE_DB")
    if url:
        return url
    return f"sqlite:///{(state or state_dir()).resolve() / 'ledger.db'}"


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

    def ledger(self) -> "Ledger":
        """The ledger, created (with its SQLite file) where it does not exist yet."""
        from orchestrator.ledger import Ledger

        return Ledger(self.db_url())

    def existing_ledger(self) -> "Optional[Ledger]":
        """The ledger, or None when the default SQLite file does not exist yet (reading creates nothing)."""
        url = self.db_url()
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
            return None
        return self.ledger()


def global_options(ctx=None) -> GlobalOptions:
    """The global options on a command's Typer context (`ctx: typer.Context`); defaults without one."""
    found = ctx.find_object(GlobalOptions) if ctx is not None else None
    return found if found is not None else GlobalOptions()
