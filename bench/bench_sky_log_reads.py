"""How much of a SkyPilot job log the watcher pulls per event refresh: incremental vs whole-log reads.

The SkyPilot backend copies the recipe's events out of the job log. Reading the whole log each
refresh (what it did before) costs the whole log every minute; reading pages from the end back to
the last event already copied costs what is new. This drives SkyPilotBackend._new_log_lines
against a log served with SkyPilot's own tail / tail_offset semantics (sky/skylet/log_lib.py,
tail_lines_from_end) and counts the lines each refresh transfers, for a log that grows by a fixed
number of lines per refresh (progress output plus one event line every `--event-every` lines).

Usage: python bench/bench_sky_log_reads.py [--refreshes 200] [--lines-per-refresh 300] [--event-every 20] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch.event_log import merge_events  # noqa: E402
from launch.skypilot import LOG_PAGE_LINES, SkyPilotBackend  # noqa: E402


class TailServer:
    """sdk.log_lines with SkyPilot's semantics: the last `tail` lines before the last `tail_offset`."""

    def __init__(self):
        self.log: list[str] = []
        self.transferred = 0

    def log_lines(self, job_id: int, *, tail, tail_offset: int = 0) -> list[str]:
        if tail is None:
            lines = list(self.log)
        else:
            end = len(self.log) - tail_offset
            lines = self.log[max(0, end - tail):max(0, end)]
        self.transferred += len(lines)
        return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--refreshes", type=int, default=200)
    parser.add_argument("--lines-per-refresh", type=int, default=300)
    parser.add_argument("--event-every", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sky-log-reads.json"))
    args = parser.parse_args()

    server = TailServer()
    backend = SkyPilotBackend(Path(tempfile.mkdtemp()))
    backend.sdk = server
    events = Path(tempfile.mkdtemp()) / "events.jsonl"
    anchor, incremental, whole, n = None, [], [], 0
    for _ in range(args.refreshes):
        for _ in range(args.lines_per_refresh):
            n += 1
            server.log.append(f'[spotune-event] {{"event": "step", "time": {n}, "attempt": 1, "step": {n}}}'
                              if n % args.event_every == 0 else f"step {n} loss 1.0")
        before = server.transferred
        lines = backend._new_log_lines(1, anchor)
        incremental.append(server.transferred - before)
        merge_events(lines, events)
        anchor = events.read_text().splitlines()[-1]
        whole.append(len(server.log))
    copied = len(events.read_text().splitlines())
    result = {"refreshes": args.refreshes, "lines_per_refresh": args.lines_per_refresh, "page_lines": LOG_PAGE_LINES,
              "final_log_lines": len(server.log), "events_copied": copied, "events_written": n // args.event_every,
              "incremental_lines_per_refresh_mean": sum(incremental) / len(incremental),
              "incremental_lines_per_refresh_max": max(incremental),
              "whole_log_lines_per_refresh_mean": sum(whole) / len(whole),
              "whole_log_lines_last_refresh": whole[-1],
              "python": platform.python_version()}
    assert copied == result["events_written"], "an event was lost"
    for key, value in result.items():
        print(f"{key}: {value:,.1f}" if isinstance(value, float) else f"{key}: {value}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
