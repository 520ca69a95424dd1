"""The recipe's events.jsonl carried home through a job's log, for backends whose run dir is remote.

On the node, `mirror_command` tails events.jsonl into stdout with a prefix while the recipe runs;
here, `merge_events` picks those lines out of the job log into a local events.jsonl. A node that
resumes re-emits the whole file (tail -n +1), so lines already seen are dropped and the first-seen
order, which is the file's order, is kept. Needs no cloud storage credentials on this machine.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from contract.events import EVENTS_FILE, parse_line

EVENT_LOG_PREFIX = "[spotune-event] "


def mirror_command(run_dir: str, until_pid: str = "$$") -> str:
    """Shell lines that stream `run_dir`/events.jsonl into stdout until process `until_pid` (by
    default the calling shell) is gone.

    A stop (SkyPilot cancel, Ray stop_job) sends SIGTERM to every process of the job. The shell
    traps it, so it waits for the recipe (which checkpoints and exits 75) and exits with its code;
    the tail ignores it, so the recipe's last events still reach the log, and it exits by itself
    once `until_pid` is gone (--pid), leaving nothing behind to hold the job's output open. A
    parent that reads the job's output to its end before it reaps the shell (SkyPilot's
    log_lib.run_with_log) keeps the exited shell a zombie, which --pid counts as alive: such a
    script passes a process of its own and ends it itself (launch/sky_scripts.py)."""
    return "\n".join([
        "trap : TERM",
        f'(trap "" TERM; tail -n +1 -F --pid={until_pid} "{run_dir}/{EVENTS_FILE}" 2>/dev/null'
        f' | sed -u "s/^/{EVENT_LOG_PREFIX}/") &'])


def flush_command(run_dir: str) -> str:
    """A shell line that prints the whole event log once more, after the recipe has exited: the
    background tail can exit with the shell before it read the last lines (a short job), and
    merge_events drops the lines it has already seen."""
    return f'sed "s/^/{EVENT_LOG_PREFIX}/" "{run_dir}/{EVENTS_FILE}" 2>/dev/null || true'


def merge_events(log_lines: Iterable[str], events_path: Path) -> Path:
    """Add the prefixed event lines of a job log to events_path (atomic rewrite, no duplicates)."""
    known = events_path.read_text().splitlines() if events_path.exists() else []
    seen = set(known)
    for line in log_lines:
        _, marker, event = line.partition(EVENT_LOG_PREFIX)
        event = event.strip()
        # A line cut off by the log (a killed tail, a chunk boundary) is not an event.
        if marker and event and event not in seen and parse_line(event) is not None:
            seen.add(event)
            known.append(event)
    events_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = events_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in known))
    os.replace(tmp, events_path)
    return events_path
