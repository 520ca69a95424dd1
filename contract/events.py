"""The recipe's process contract: exit codes, `events.jsonl`, and the one JSONL reader and tailer.

`events.jsonl` is the recipe's progress report to the orchestrator (DESIGN.md): one JSON object
per line, append-only, each with `event`, `time` (unix seconds) and `attempt`, plus the payload
of its kind (the TypedDicts below). Every line is flushed as it is written, so a reader tailing
the file (or a SIGKILL) never sees half a line; events that mark a durable state change are
also fsynced, because the orchestrator bills and plans rework from them.

The same reader serves every append-only JSONL file spotune keeps (events, the local
supervisor's attempts): complete lines only, a torn line from a killed writer skipped.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, TypedDict

# --- exit codes -----------------------------------------------------------------------------
EXIT_FINISHED = 0
EXIT_CRASH = 1
EXIT_BAD_INPUT = 2   # one line on stderr, nothing written to checkpoints; never worth a retry
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT, after a clean checkpoint (EX_TEMPFAIL: try again)
# The run cannot go on, and running it again would end the same way: a launcher never retries these.
EXIT_DISK_FULL = 74    # ENOSPC, EROFS or EDQUOT (EX_IOERR): partial files removed, the last checkpoint kept
EXIT_OVER_BUDGET = 80  # spent + the next checkpoint interval would pass the budget: stopped after a checkpoint
EXIT_DIVERGED = 81     # the loss went NaN/inf: stopped without saving the non-finite weights
FINAL_EXIT_CODES = frozenset({EXIT_BAD_INPUT, EXIT_DISK_FULL, EXIT_OVER_BUDGET, EXIT_DIVERGED})

EVENTS_FILE = "events.jsonl"

# --- event names and payloads ---------------------------------------------------------------
START = "start"
STEP = "step"
CHECKPOINT = "checkpoint"
CHECKPOINT_SKIPPED = "checkpoint_skipped"
PREEMPTED = "preempted"
FINISHED = "finished"
ERROR = "error"
OVER_BUDGET = "over_budget"
DIVERGED = "diverged"
DEVIATION = "deviation"

EVENT_NAMES = (START, STEP, CHECKPOINT, CHECKPOINT_SKIPPED, PREEMPTED, FINISHED, ERROR, OVER_BUDGET, DIVERGED,
               DEVIATION)
# Events that change what the ledger bills or what a resume starts from: fsynced when written.
DURABLE_EVENTS = frozenset({START, CHECKPOINT, CHECKPOINT_SKIPPED, PREEMPTED, FINISHED, ERROR, OVER_BUDGET,
                            DIVERGED})
# Events the ledger keeps as the run's history (steps and checkpoints have tables of their own).
RUN_EVENTS = (START, CHECKPOINT_SKIPPED, PREEMPTED, FINISHED, ERROR, OVER_BUDGET, DIVERGED, DEVIATION)


class StartEvent(TypedDict, total=False):
    resumed_from_step: Optional[int]
    device: str
    gpu_name: Optional[str]
    gpu_count: int
    total_steps: int
    total_tokens: int
    method: str
    global_batch: int
    # The execution config this attempt runs (contract.execution.ExecutionConfig.ran() less gpu and
    # gpu_count, which the fields above give as the hardware names them): the plan's, changed only
    # where a `deviation` logged before this event says so; and who decided it: "plan" (the node
    # spec's execution section) or "recipe" (its fallback, for a spec without one).
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    attention: str
    dtype: str
    sharding: str
    decided_by: str


class DeviationEvent(TypedDict):
    """The recipe runs something other than the plan's execution config; logged before `start`."""

    kind: str              # device | gpu | gpu_count | dtype | attention | memory
    reason: str            # one line: what was planned, what the node has, what runs instead
    planned: dict          # the planned values of the fields that changed
    running: dict          # what runs instead


class StepEvent(TypedDict):
    step: int
    tokens: int            # cumulative trained tokens
    loss: Optional[float]  # null where the loss was not finite
    lr: float
    tokens_per_second: float


class CheckpointEvent(TypedDict):
    step: int
    path: str
    seconds: float
    bytes: int


class CheckpointSkippedEvent(TypedDict):
    step: int
    path: str
    reason: str
    moved_to: str


class PreemptedEvent(TypedDict):
    step: int
    signal: Optional[str]


class FinishedEvent(TypedDict):
    step: int
    tokens: int
    final_loss: Optional[float]
    train_seconds: float
    output_path: str


class ErrorEvent(TypedDict, total=False):
    message: str
    kind: str              # bad_input | crash | disk_full


class OverBudgetEvent(TypedDict):
    step: int              # the step of the checkpoint it stopped after
    spent: float           # USD, this attempt and every earlier one (the spend file)
    budget: float
    price_per_hour: float
    next_interval_cost: float  # what running to the next checkpoint would have added
    message: str


class DivergedEvent(TypedDict):
    step: int              # the first step whose loss (or updated weights) was not finite
    loss: Optional[float]  # null: NaN/inf are not JSON
    checkpoint_step: Optional[int]  # the last checkpoint, all finite; null when none was saved
    message: str


PAYLOADS: dict[str, type] = {START: StartEvent, STEP: StepEvent, CHECKPOINT: CheckpointEvent,
                             CHECKPOINT_SKIPPED: CheckpointSkippedEvent, PREEMPTED: PreemptedEvent,
                             FINISHED: FinishedEvent, ERROR: ErrorEvent, OVER_BUDGET: OverBudgetEvent,
                             DIVERGED: DivergedEvent, DEVIATION: DeviationEvent}


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
        self._torn = False

    def emit(self, event: str, **fields: Any) -> Optional[dict]:
        if event not in PAYLOADS:
            raise ValueError(f"unknown event {event!r} (the contract has: {', '.join(EVENT_NAMES)})")
        if not self.enabled:
            return None
        record = {"event": event, "time": round(time.time(), 3), "attempt": self.attempt}
        record.update({k: _jsonable(v) for k, v in fields.items()})
        line = json.dumps(record, separators=(", ", ": ")) + "\n"
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
                if self._torn:  # the last write failed midway: this line must not continue it
                    line = "\n" + line
            self._file.write(line)
            self._file.flush()
            if event in DURABLE_EVENTS:
                os.fsync(self._file.fileno())
        except OSError:
            # A full disk: drop what is buffered (never retried into the middle of a later line),
            # so the next event, once there is room, starts on a line of its own.
            self._torn = True
            self._discard()
            raise
        self._torn = False
        return record

    def _discard(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --- reading --------------------------------------------------------------------------------

def read_new_lines(path: Path | str, start: int = 0) -> tuple[list[tuple[int, bytes]], int]:
    """Complete lines from byte `start` on, each with its offset, and where reading stopped.

    The tailer: a caller keeps the returned offset and passes it back, so each read costs only
    what was appended. A line without its newline yet is left for the next read. A file shorter
    than `start` was replaced, not appended to: it is read from the beginning."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], start
    if size < start:
        start = 0
    with path.open("rb") as f:
        f.seek(start)
        data = f.read(size - start)
    lines: list[tuple[int, bytes]] = []
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        lines.append((start + pos, data[pos:nl]))
        pos = nl + 1
    return lines, start + pos


def parse_line(raw: bytes | str) -> Optional[dict]:
    """One JSONL line as a dict, or None for a torn, blank or non-object line."""
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_jsonl(path: Path | str) -> list[dict]:
    """Every complete JSON object line in `path` (none if it does not exist)."""
    lines, _ = read_new_lines(path)
    return [record for _, raw in lines if (record := parse_line(raw)) is not None]


def next_attempt(path: Path | str) -> int:
    """One more than the highest attempt that has started in `path`. A backend that re-runs the
    same command after a recovery (SkyPilot managed jobs) gets distinct attempt numbers this way."""
    started = [e.get("attempt") or 0 for e in read_jsonl(path) if e.get("event") == START]
    return max(started, default=0) + 1


def ended_preempted(path: Path | str) -> bool:
    """Whether the newest event is `preempted`. torchrun reports a worker's exit 75 as a plain
    failure, so a launcher asks the event log what really happened."""
    events = read_jsonl(path)
    return bool(events) and events[-1].get("event") == PREEMPTED


if __name__ == "__main__":
    # `python -m contract.events ended-preempted EVENTS.jsonl`: exit 0 if so, 1 if not (for shell launchers).
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "ended-preempted":
        print("usage: python -m contract.events ended-preempted EVENTS.jsonl", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(0 if ended_preempted(sys.argv[2]) else 1)
