"""Where state lives: flag, then environment, then the default."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def state_dir(flag: Optional[str] = None) -> Path:
    return Path(flag or os.environ.get("SPOTUNE_STATE_DIR") or "state").expanduser()


def db_url(flag: Optional[str] = None, state: Optional[Path] = None) -> str:
    url = flag or os.environ.get("SPOTUNE_DB")
    if url:
        return url
    return f"sqlite:///{(state or state_dir()).resolve() / 'ledger.db'}"
