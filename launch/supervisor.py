"""The local backend's supervisor: a small detached process that owns one job's recovery.

`python -m launch.supervisor RUN_DIR` reads `RUN_DIR/supervisor.json`, runs the recipe as a
child process (`python -m recipes.sft SPEC --run-dir RUN_DIR --attempt N`) and records every
attempt in `RUN_DIR/attempts.jsonl`: a `start` line (placement, time, pid) and an `end` line
(reason, exit code). On preemption (exit 75, or a signal the supervisor itself sent) it waits
the restart time and starts the next attempt, which resumes from the newest checkpoint. This is
what a spot recovery does on a cloud, made to happen on one machine.

The supervisor holds an exclusive flock on `RUN_DIR/supervisor.lock` for its whole life (the
descriptor is inherited from the process that started it, so there is no moment when the job
exists but the lock is free); a reader that can take the lock knows the supervisor is gone.

Control: `RUN_DIR/control.json` (`{"action": "stop", "graceful": true}`), written by
`LocalBackend.cancel`, asks the supervisor to SIGTERM the recipe (so it checkpoints) and stop.

The budget: the supervisor runs for the job's whole life, so it guards the spec's budget whether
or not a CLI is watching. Spent is the ledger's own sum (each attempt's wall hours x its $/h, from
`attempts.jsonl`); once spent plus running to the next checkpoint and stopping would pass the
budget (contract/budget.py), the recipe is stopped with a checkpoint, no attempt is started after
it, and the job ends `over_budget`.

Exits that a retry cannot fix end the job at once: bad input (2), a full or read-only disk (74),
the node's own budget stop (80), a loss gone NaN (81). A supervisor started again on a run dir
whose supervisor died (`LocalBackend.restart`) first closes the attempt it left open, after its
recipe has exited, and goes on from the last checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from contract.events import (DIVERGED, ERROR, EVENTS_FILE, EXIT_BAD_INPUT, EXIT_DISK_FULL, EXIT_DIVERGED,
                             EXIT_OVER_BUDGET, EXIT_PREEMPTED, OVER_BUDGET, START, STEP, parse_line, read_jsonl,
                             read_new_lines)
from contract.faults import describe_disk_error, disk_error
from contract.placement import Placement
from launch.budget import BudgetGuard

ATTEMPTS_FILE = "attempts.jsonl"
CONFIG_FILE = "supervisor.json"
CONTROL_FILE = "control.json"
LOCK_FILE = "supervisor.lock"

TICK_SECONDS = 0.1


@dataclass
class SupervisorConfig:
    """`supervisor.json`: everything the detached supervisor needs, written once by submit."""

    job_id: str
    spec_path: str
    placement: Placement
    python: str = sys.executable
    env: dict = field(default_factory=dict)
    restart_seconds: float = 3.0
    simulate_preemptions: int = 0
    hard: bool = False
    mixed_signals: bool = False   # simulated preemptions alternate SIGTERM and SIGKILL (hard is ignored)
    seed: int = 0
    max_consecutive_crashes: int = 3
    # How long a recipe may take to checkpoint and exit after SIGTERM before it is SIGKILLed
    # (AWS gives a spot instance two minutes, GCP thirty seconds).
    grace_seconds: float = 120.0
    budget: Optional[str] = None                  # USD, a Decimal string: the spec's constraints.budget
    checkpoint_every_minutes: Optional[float] = None
    checkpoint_every_steps: Optional[int] = None

    @classmethod
    def load(cls, run_dir: Path) -> "SupervisorConfig":
        raw = json.loads((run_dir / CONFIG_FILE).read_text())
        return cls(**{**raw, "placement": Placement.from_json(raw["placement"])})

    def save(self, run_dir: Path) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        (run_dir / CONFIG_FILE).write_text(json.dumps({**values, "placement": self.placement.to_json()}, indent=2))


def append_jsonl(path: Path, record: dict) -> None:
    # One write of one line: readers never see half a record.
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


class EventTail:
    """Reads the recipe's events.jsonl incrementally (the recipe appends, never rewrites)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def new_events(self) -> list[dict]:
        lines, self.offset = read_new_lines(self.path, self.offset)
        return [event for _, raw in lines if (event := parse_line(raw)) is not None]


def _die_with_parent_prefix() -> list[str]:
    """A command prefix that makes the recipe get SIGTERM (checkpoint and exit) if the supervisor
    dies, so a killed supervisor never leaves an orphan training run burning money. util-linux's
    setpriv sets the parent-death signal in the child itself; where it is missing (not Linux)
    an orphan is still found by poll ("supervisor died")."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def _last_line(path: Path, limit: int = 240) -> str:
    try:
        lines = [l.strip() for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except FileNotFoundError:
        return ""
    return lines[-1][:limit] if lines else ""


class InjectionPlan:
    """When to preempt the current attempt: after it has logged a seeded random step, so each
    simulated preemption costs real work (lost with SIGKILL, checkpointed with SIGTERM)."""

    def __init__(self, count: int, seed: int):
        self.left = count
        self.rng = random.Random(seed)
        self.trigger_step: Optional[int] = None

    def arm(self, start_step: int, total_steps: Optional[int]) -> None:
        self.trigger_step = None
        if self.left <= 0:
            return
        if total_steps is None or total_steps - start_step < 2:
            self.trigger_step = start_step + 1
            return
        # Spread the remaining preemptions over the remaining steps, keeping a share for the attempt
        # after the last one: the supervisor signals up to a tick after it reads the step, and a
        # trigger near the end would come after a fast recipe had finished, and never happen.
        span = max(1, (total_steps - start_step - 1) // (self.left + 1))
        self.trigger_step = start_step + self.rng.randint(1, span)

    def due(self, step: int) -> bool:
        return self.trigger_step is not None and step >= self.trigger_step


def last_activity(run_dir: Path, n: int) -> float:
    """When a dead supervisor's open attempt last did anything: stable however often it is asked."""
    times = [p.stat().st_mtime for p in (run_dir / "logs" / f"attempt-{n}.log", run_dir / EVENTS_FILE) if p.exists()]
    return max(times) if times else (run_dir / ATTEMPTS_FILE).stat().st_mtime


def _is_our_recipe(pid: int, run_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return False
    return state != "Z" and b"recipes.sft" in cmdline and str(run_dir).encode() in cmdline


class Supervisor:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.cfg = SupervisorConfig.load(run_dir)
        self.attempts_path = run_dir / ATTEMPTS_FILE
        self.logs_dir = run_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.injections = InjectionPlan(self.cfg.simulate_preemptions, self.cfg.seed)
        self.stop_requested: Optional[dict] = None
        self.budget: Optional[BudgetGuard] = None
        self.budget_reason: Optional[str] = None

    # --- control -------------------------------------------------------------------------
    def _check_control(self) -> Optional[dict]:
        if self.stop_requested is None:
            path = self.run_dir / CONTROL_FILE
            if path.exists():
                try:
                    self.stop_requested = json.loads(path.read_text())
                except (json.JSONDecodeError, OSError):
                    return None  # being written; read it on the next tick
        return self.stop_requested

    def _on_sigterm(self, signum, frame) -> None:
        # Someone stopped the supervisor itself (shutdown, kill): stop the job gracefully.
        self.stop_requested = {"action": "stop", "graceful": True, "by": f"signal {signum}"}

    # --- one attempt ---------------------------------------------------------------------
    def _start(self, n: int) -> subprocess.Popen:
        cmd = [*_die_with_parent_prefix(), self.cfg.python, "-m", "recipes.sft", self.cfg.spec_path,
               "--run-dir", str(self.run_dir), "--attempt", str(n)]
        env = {**os.environ, **self.cfg.env, "SPOTUNE_ATTEMPT": str(n), "PYTHONUNBUFFERED": "1"}
        log = open(self.logs_dir / f"attempt-{n}.log", "ab")
        proc = subprocess.Popen(cmd, cwd=self.run_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        log.close()
        started = time.time()
        append_jsonl(self.attempts_path, {"record": "start", "attempt": n, "time": started,
                                          "pid": proc.pid, "placement": self.cfg.placement.to_json()})
        self.budget.attempt_started(started)
        return proc

    def _watch(self, n: int, proc: subprocess.Popen, tail: EventTail) -> tuple[Optional[str], Optional[int]]:
        """Wait for the attempt to end. Returns (why we signalled it, the signal), if we did."""
        sent: Optional[str] = None
        sent_signal: Optional[int] = None
        sent_at = 0.0
        while proc.poll() is None:
            for ev in tail.new_events():
                if ev.get("attempt") != n:
                    continue
                self.budget.saw(ev)
                if ev.get("event") == START:
                    self.injections.arm(ev.get("resumed_from_step") or 0, ev.get("total_steps"))
                elif ev.get("event") == STEP and sent is None and self.injections.due(int(ev.get("step", 0))):
                    sent_signal = self._injection_signal()
                    sent, sent_at = "preempt", time.time()
                    self.injections.left -= 1
                    self.injections.trigger_step = None
                    proc.send_signal(sent_signal)
            if sent is None and (why := self.budget.over(time.time())) is not None:
                self.budget_reason = f"{why}; stopped with a checkpoint"
                sent, sent_signal, sent_at = "budget", signal.SIGTERM, time.time()
                proc.send_signal(sent_signal)
            stop = self._check_control()
            if stop is not None and sent != "stop":
                graceful = stop.get("graceful", True)
                if sent is None or not graceful:  # a preemption SIGTERM already asks for a checkpoint
                    sent_signal = signal.SIGTERM if graceful else signal.SIGKILL
                    sent_at = time.time()
                    proc.send_signal(sent_signal)
                sent = "stop"
            if sent is not None and sent_signal == signal.SIGTERM and time.time() - sent_at > self.cfg.grace_seconds:
                proc.kill()
                sent_signal = signal.SIGKILL
            time.sleep(TICK_SECONDS)
        for ev in tail.new_events():  # this attempt's last events
            if ev.get("attempt") == n:
                self.budget.saw(ev)
        return sent, sent_signal

    def _injection_signal(self) -> int:
        if self.cfg.mixed_signals:  # the first one a spot notice, the next one none, and so on
            fired = self.cfg.simulate_preemptions - self.injections.left
            return signal.SIGKILL if fired % 2 else signal.SIGTERM
        return signal.SIGKILL if self.cfg.hard else signal.SIGTERM

    def _classify(self, n: int, rc: int, sent: Optional[str], sent_signal: Optional[int]) -> tuple[str, str]:
        """(end reason, one-line detail) for an attempt that exited with rc."""
        by_our_signal = sent is not None and (rc == EXIT_PREEMPTED or rc == -int(sent_signal or 0))
        how = f"exit {rc}" if rc >= 0 else f"killed by {signal.Signals(-rc).name}"
        if rc == 0:
            return "finished", how
        if rc == EXIT_OVER_BUDGET or (sent == "budget" and by_our_signal):
            return "over_budget", how
        if sent == "stop" and by_our_signal:
            return "cancelled", how
        if sent == "preempt" and by_our_signal:
            name = signal.Signals(sent_signal).name
            return "preempted", f"simulated {name}, {how}"
        if rc == EXIT_PREEMPTED:
            return "preempted", how
        return "failed", f"{how}: {self._failure_message(n)}"

    def _failure_message(self, n: int) -> str:
        said = [e for e in read_jsonl(self.run_dir / EVENTS_FILE)
                if e.get("event") in (ERROR, DIVERGED, OVER_BUDGET) and e.get("attempt") == n]
        if said:
            return str(said[-1].get("message", ""))[:240]
        # The recipe's one `error:` line, where its event could not be written (a full disk).
        return _last_line(self.logs_dir / f"attempt-{n}.log").removeprefix("error: ") or "no output"

    def _end_job(self, state: str, detail: str) -> None:
        append_jsonl(self.attempts_path, {"record": "job_end", "state": state, "detail": detail, "time": time.time()})

    def _wait_restart(self) -> bool:
        """Sleep the restart time; False if a stop was requested meanwhile."""
        deadline = time.time() + self.cfg.restart_seconds
        while time.time() < deadline:
            if self._check_control() is not None:
                return False
            time.sleep(min(TICK_SECONDS, max(0.0, deadline - time.time())))
        return self._check_control() is None

    def _close_orphaned_attempt(self, records: list[dict]) -> list[dict]:
        """A supervisor that died left its last attempt open, and its recipe got SIGTERM (parent-death
        signal) and is checkpointing. Wait for that recipe to exit (SIGKILL after the grace time), so
        two never share the checkpoints, then close the attempt as poll reported it meanwhile."""
        starts = [r for r in records if r.get("record") == "start"]
        ended = {r["attempt"] for r in records if r.get("record") == "end"}
        if not starts or starts[-1]["attempt"] in ended:
            return records
        n, pid = starts[-1]["attempt"], starts[-1].get("pid")
        if isinstance(pid, int) and _is_our_recipe(pid, self.run_dir):
            deadline = time.time() + self.cfg.grace_seconds
            while _is_our_recipe(pid, self.run_dir) and time.time() < deadline:
                time.sleep(TICK_SECONDS)
            if _is_our_recipe(pid, self.run_dir):
                os.kill(pid, signal.SIGKILL)
        end = {"record": "end", "attempt": n, "time": last_activity(self.run_dir, n), "reason": "failed",
               "exit_code": None, "detail": "supervisor died"}
        append_jsonl(self.attempts_path, end)
        return [*records, end]

    # --- the job -------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._on_sigterm)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        records = self._close_orphaned_attempt(read_jsonl(self.attempts_path))
        n = max((r["attempt"] for r in records if r.get("record") == "start"), default=0)
        done = sum(1 for r in records if r.get("record") == "end" and str(r.get("detail", "")).startswith("simulated"))
        self.injections.left = max(0, self.injections.left - done)  # a restarted supervisor owes only the rest
        self.budget = BudgetGuard(self.cfg.budget, self.cfg.placement.price_per_hour, records,
                                  self.cfg.checkpoint_every_minutes, self.cfg.checkpoint_every_steps)
        tail = EventTail(self.run_dir / EVENTS_FILE)
        tail.new_events()  # events of earlier attempts never trigger anything
        crashes_in_a_row = 0
        while True:
            if self._check_control() is not None:
                self._end_job("cancelled", "cancelled before the next attempt started")
                return 0
            if n > 0 and (why := self.budget.over(time.time())) is not None:  # an attempt after a preemption
                self._end_job("over_budget", f"{why}; not started again")
                return 0
            n += 1
            proc = self._start(n)
            sent, sent_signal = self._watch(n, proc, tail)
            rc = proc.returncode
            reason, detail = self._classify(n, rc, sent, sent_signal)
            ended = time.time()
            append_jsonl(self.attempts_path, {"record": "end", "attempt": n, "time": ended,
                                              "reason": reason, "exit_code": rc, "detail": detail})
            self.budget.attempt_ended(ended)
            if reason == "finished":
                self._end_job("succeeded", f"finished in {n} attempt{'s' if n > 1 else ''}")
                return 0
            if reason == "over_budget":
                self._end_job("over_budget", self.budget_reason or self._failure_message(n))
                return 0
            if reason == "cancelled" or (self.stop_requested is not None and reason != "preempted"):
                self._end_job("cancelled", "cancelled; the recipe checkpointed first" if reason == "cancelled"
                              else f"cancelled; last attempt {detail}")
                return 0
            if reason == "failed":
                if rc == EXIT_BAD_INPUT:
                    self._end_job("failed", f"bad input: {self._failure_message(n)}")
                    return 0
                if rc in (EXIT_DISK_FULL, EXIT_DIVERGED):  # a retry would end the same way
                    self._end_job("failed", self._failure_message(n))
                    return 0
                crashes_in_a_row += 1
                if crashes_in_a_row >= self.cfg.max_consecutive_crashes:
                    self._end_job("failed", f"recipe crashed {crashes_in_a_row} times in a row; last: {detail}")
                    return 0
            else:
                crashes_in_a_row = 0
            if not self._wait_restart():
                self._end_job("cancelled", "cancelled while waiting to restart")
                return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m launch.supervisor RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0]).resolve()
    try:
        supervisor = Supervisor(run_dir)
    except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
        print(f"error: cannot read {run_dir / CONFIG_FILE}: {e}", file=sys.stderr)
        return 2
    try:
        return supervisor.run()
    except Exception as e:  # recorded, so poll reports why instead of "supervisor died"
        full = disk_error(e)
        why = describe_disk_error(full) if full else f"supervisor error: {type(e).__name__}: {e}"
        try:
            supervisor._end_job("failed", why)
        except OSError:
            pass  # the disk that failed holds the record too: poll says "supervisor died"
        if full:
            print(f"error: {why}", file=sys.stderr)
            return EXIT_DISK_FULL
        raise


if __name__ == "__main__":
    sys.exit(main())
