"""`events.jsonl`: the recipe's progress report to the orchestrator (DESIGN.md's contract).

One JSON object per line, append-only, each with `event`, `time` (unix seconds) and `attempt`.
Every line is flushed as it is written, so a reader tailing the file (or a SIGKILL) never sees
half a line; events that mark a durable state change (checkpoint, preempted, finished, error)
are also fsynced, because the orchestrator bills and plans rework from them.

The exit code is the other half of the contract (docs/contracts.md).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

EXIT_FINISHED = 0
EXIT_CRASH = 1
EXIT_BAD_INPUT = 2  # one line on stderr, nothing written to checkpoints
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT, after a clean checkpoint (EX_TEMPFAIL: try again)

DURABLE_EVENTS = frozenset({"start", "checkpoint", "checkpoint_skipped", "preempted", "finished", "error"})


def _jsonable(value: Any) -> Any:
    # NaN/inf are not JSON; a diverged loss is reported as null rather than breaking readers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class EventLog:
    """Appends events to `path`; a disabled log (non-zero ranks under torchrun) writes nothing."""

    def __init__(self, path: Path | str, attempt: int, enabled: bool = True):
        self.path = Path(path)
        self.attempt = attempt
        self.enabled = enabled
        self._file = None

    def emit(self, event: str, **fields: Any) -> Optional[dict]:
        if not self.enabled:
            return None
        record = {"event": event, "time": round(time.time(), 3), "attempt": self.attempt}
        record.update({k: _jsonable(v) for k, v in fields.items()})
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record, separators=(", ", ": ")) + "\n")
        self._file.flush()
        if event in DURABLE_EVENTS:
            os.fsync(self._file.fileno())
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_events(path: Path | str) -> list[dict]:
    """All complete events in `path` (a torn last line from a killed writer is ignored)."""
    events = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return events
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def next_attempt(path: Path | str) -> int:
    """One more than the highest attempt that has started in `path`. A backend that re-runs the
    same command after a recovery (SkyPilot managed jobs) gets distinct attempt numbers this way."""
    started = [e.get("attempt") or 0 for e in read_events(path) if e.get("event") == "start"]
    return max(started, default=0) + 1


def ended_preempted(path: Path | str) -> bool:
    """Whether the newest event is `preempted`. torchrun reports a worker's exit 75 as a plain
    failure, so a launcher asks the event log what really happened."""
    events = read_events(path)
    return bool(events) and events[-1].get("event") == "preempted"


if __name__ == "__main__":
    # `python -m recipes.events ended-preempted EVENTS.jsonl`: exit 0 if so, 1 if not (for shell launchers).
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "ended-preempted":
        print("usage: python -m recipes.events ended-preempted EVENTS.jsonl", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(0 if ended_preempted(sys.argv[2]) else 1)
