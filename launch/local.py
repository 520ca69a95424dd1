"""The local backend: the job runs on this machine, watched over by a detached supervisor.

`submit` writes the run directory (the node spec as `spec.yaml`, `supervisor.json`) and
starts `python -m launch.supervisor RUN_DIR` in a new session, so the job outlives the CLI that
launched it. The supervisor (launch/supervisor.py) owns recovery; this class only reads what it
records (`attempts.jsonl`, the supervisor's lock) and writes its control file.

The external id of a local job is the absolute path of its run directory: everything needed to
re-attach is there, whatever state dir the next CLI is started with.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

import yaml

from contract.backend import (TERMINAL_STATES, BackendError, DeviceReport, Feasibility, LaunchRequest, Observation,
                              ObservedAttempt)
from contract.budget import PRICE_ENV
from contract.events import EVENTS_FILE, read_jsonl
from contract.faults import kill_point
from contract.placement import Placement
from launch.supervisor import (ATTEMPTS_FILE, CONFIG_FILE, CONTROL_FILE, LOCK_FILE, SupervisorConfig, append_jsonl,
                               last_activity)

REPO_ROOT = Path(__file__).resolve().parent.parent


def detect_gpu() -> tuple[Optional[str], int, Optional[float]]:
    """(name as nvidia-smi reports it, count, GiB per GPU) of this machine's GPUs, without
    importing torch; (None, 0, None) where there is no NVIDIA GPU or driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, 0, None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None, 0, None
    rows = [r.split(",") for r in out.stdout.strip().splitlines() if r.strip()] if out.returncode == 0 else []
    if not rows:
        return None, 0, None
    name = rows[0][0].strip()
    try:
        gib = float(rows[0][1]) / 1024
    except (IndexError, ValueError):
        gib = None
    return name, len(rows), gib


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def supervisor_alive(run_dir: Path) -> bool:
    """True while the supervisor holds its lock. Taking the lock ourselves proves it is gone."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also releases a lock we took
    return False


def job_end_record(records: list[dict]) -> Optional[dict]:
    """The record that ended the job, unless a `continue` (LocalBackend.continue_stopped) came after it."""
    last = next((r for r in reversed(records) if r.get("record") in ("job_end", "continue")), None)
    return last if last is not None and last.get("record") == "job_end" else None


class LocalBackend:
    name = "local"
    pricing = "hourly"
    options = ("simulate_preemptions", "hard", "seed", "restart_seconds")
    poll_seconds = 1.0  # a local file read: cheap
    max_nodes = 1       # this one machine: options spanning nodes are not launchable here (orchestrator/launchable.py)

    def __init__(self, state_dir: Optional[Path] = None, *, restart_seconds: float = 3.0,
                 simulate_preemptions: int = 0, hard: bool = False, seed: int = 0, mixed_signals: bool = False,
                 max_consecutive_crashes: int = 3, grace_seconds: float = 120.0, python: Optional[str] = None):
        # The run dir comes with each request, and a local job's external id is its run dir, so
        # the state dir is not needed here; it is accepted for the one constructor shape.
        if simulate_preemptions < 0:
            raise BackendError("--simulate-preemptions must be 0 or more")
        self.restart_seconds = restart_seconds
        self.simulate_preemptions = simulate_preemptions
        self.hard = hard
        self.mixed_signals = mixed_signals
        self.seed = seed
        self.max_consecutive_crashes = max_consecutive_crashes
        self.grace_seconds = grace_seconds
        self.python = python or sys.executable

    def device(self) -> DeviceReport:
        return DeviceReport(*detect_gpu())

    def feasible(self, spec, placements) -> Feasibility:
        return Feasibility(tuple(placements))  # the hardware it has is the plan: nothing to rule out

    def describe(self, request: LaunchRequest) -> str:
        return "\n".join([
            f"  supervisor: python -m launch.supervisor {request.run_dir}   (detached; restarts after preemption)",
            f"  recipe:     python -m recipes.sft {request.run_dir}/spec.yaml --run-dir {request.run_dir} --attempt N",
            f"  placement:  {request.placements[0].label()}"])

    # --- submit --------------------------------------------------------------------------
    def submit(self, request: LaunchRequest) -> str:
        run_dir = Path(request.run_dir).resolve()
        if (run_dir / ATTEMPTS_FILE).exists():
            raise BackendError(f"run directory already holds a job: {run_dir}")
        if not request.placements:
            raise BackendError("the local backend needs a placement (this machine's GPU and price)")
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        spec_copy = run_dir / "spec.yaml"
        spec_copy.write_text(yaml.safe_dump(request.node_spec, sort_keys=False))
        spec = request.spec
        budget = spec.constraints.budget
        config = SupervisorConfig(
            job_id=request.job_id, spec_path=str(spec_copy), placement=request.placements[0],
            # The supervisor guards the budget for the job's whole life: the recipe's own guard (for
            # nodes nothing else watches) stays off, so one rule owns each stop.
            python=self.python, env={k: v for k, v in request.env.items() if k != PRICE_ENV},
            restart_seconds=self.restart_seconds,
            simulate_preemptions=self.simulate_preemptions, hard=self.hard, seed=self.seed,
            mixed_signals=self.mixed_signals,
            max_consecutive_crashes=self.max_consecutive_crashes, grace_seconds=self.grace_seconds,
            budget=None if budget is None else str(budget),
            checkpoint_every_minutes=spec.checkpoint.every_minutes, checkpoint_every_steps=spec.checkpoint.every_steps)
        config.save(run_dir)
        kill_point("local:run-dir-written")
        if not self._start_supervisor(run_dir):
            raise BackendError(f"a supervisor is already running in {run_dir}")
        kill_point("local:supervisor-started")
        return str(run_dir)

    def _start_supervisor(self, run_dir: Path) -> bool:
        """Start the supervisor unless one holds the lock already (False then)."""
        # Lock before starting: the supervisor inherits the locked descriptor, so from the
        # moment this returns, "lock free" can only mean "supervisor gone".
        lock_fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            return False
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
        env.pop("SPOTUNE_KILL_AT", None)  # a test's kill point is for the launching process alone
        try:
            with open(run_dir / "logs" / "supervisor.log", "ab") as log:
                proc = subprocess.Popen([self.python, "-m", "launch.supervisor", str(run_dir)],
                                        cwd=run_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(lock_fd,))
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{proc.pid}\n".encode(), 0)
        finally:
            os.close(lock_fd)
        return True

    # --- write-ahead recovery ------------------------------------------------------------
    def find(self, job_id: str, run_dir: Path) -> Optional[str]:
        """A local job exists once its supervisor.json is written: its external id is its run dir."""
        run_dir = Path(run_dir).resolve()
        return str(run_dir) if (run_dir / CONFIG_FILE).exists() else None

    def restart(self, external_id: str) -> bool:
        """Start a supervisor again where the last one died (or was never started) without ending
        the job; it closes the open attempt and resumes from the last checkpoint."""
        run_dir = self._run_dir(external_id)
        if supervisor_alive(run_dir):
            return False
        if job_end_record(read_jsonl(run_dir / ATTEMPTS_FILE)) is not None:
            return False
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        return self._start_supervisor(run_dir)

    def continue_stopped(self, external_id: str, *, budget: Optional[str] = None) -> str:
        """Go on with a job that stopped (cancelled, over budget): a new supervisor on the same run
        dir, so attempts keep their numbers and the recipe resumes from its newest verified
        checkpoint. `budget` (USD, a Decimal string) replaces the budget the supervisor guards. A
        `continue` record in attempts.jsonl marks where the earlier job_end stops counting."""
        run_dir = self._run_dir(external_id)
        records = read_jsonl(run_dir / ATTEMPTS_FILE)
        ended = job_end_record(records)
        if supervisor_alive(run_dir) or ended is None:
            raise BackendError(f"the job at {run_dir} is still running; nothing to continue")
        if ended.get("state") not in ("cancelled", "over_budget"):
            raise BackendError(f"the job at {run_dir} ended {ended.get('state')}; only a cancelled or "
                               "over-budget job can be continued")
        config = SupervisorConfig.load(run_dir)
        config.budget = budget
        config.simulate_preemptions = 0  # the rehearsal belonged to the launch
        config.save(run_dir)
        node_spec = yaml.safe_load(Path(config.spec_path).read_text())  # what the node reads, kept in step
        node_spec.setdefault("constraints", {})["budget"] = None if budget is None else float(budget)
        Path(config.spec_path).write_text(yaml.safe_dump(node_spec, sort_keys=False))
        (run_dir / CONTROL_FILE).unlink(missing_ok=True)  # the stop that ended it is done
        append_jsonl(run_dir / ATTEMPTS_FILE, {"record": "continue", "time": time.time(), "budget": budget})
        self._start_supervisor(run_dir)
        return str(run_dir)

    # --- poll ----------------------------------------------------------------------------
    def _run_dir(self, external_id: str) -> Path:
        run_dir = Path(external_id)
        if not (run_dir / CONFIG_FILE).exists():
            raise BackendError(f"no local run at {run_dir}")
        return run_dir

    def poll(self, external_id: str) -> Observation:
        run_dir = self._run_dir(external_id)
        # Liveness first, records second: a supervisor that exits between the two reads has
        # already written its job_end line, so it is never mistaken for one that died.
        alive = supervisor_alive(run_dir)
        records = read_jsonl(run_dir / ATTEMPTS_FILE)
        starts = {r["attempt"]: r for r in records if r.get("record") == "start"}
        ends = {r["attempt"]: r for r in records if r.get("record") == "end"}
        job_end = job_end_record(records)
        died = job_end is None and not alive

        attempts = []
        for n in sorted(starts):
            start, end = starts[n], ends.get(n)
            if end is not None:
                ended_at, reason, detail = _utc(end["time"]), end["reason"], end.get("detail")
            elif died:
                ended_at, reason, detail = _utc(last_activity(run_dir, n)), "failed", "supervisor died"
            else:
                ended_at, reason, detail = None, None, None
            attempts.append(ObservedAttempt(
                n=n, placement=Placement.from_json(start["placement"]), started_at=_utc(start["time"]),
                ended_at=ended_at, end_reason=reason, external_id=f"pid {start.get('pid')}", detail=detail))

        if job_end is not None:
            state, detail = job_end["state"], job_end.get("detail")
        elif died:
            state, detail = "failed", "supervisor died"
        elif not attempts:
            state, detail = "pending", None
        elif attempts[-1].end_reason is None:
            state, detail = "running", None
        else:
            state, detail = "recovering", f"attempt {attempts[-1].n} {attempts[-1].end_reason}; restarting"
        return Observation(state=state, attempts=tuple(attempts), detail=detail,
                           events_path=run_dir / EVENTS_FILE)

    # --- cancel / logs -------------------------------------------------------------------
    def cancel(self, external_id: str, *, graceful: bool = True) -> None:
        run_dir = self._run_dir(external_id)
        if not supervisor_alive(run_dir):
            return  # finished, failed or died: nothing left to stop
        tmp = run_dir / (CONTROL_FILE + ".tmp")
        tmp.write_text(json.dumps({"action": "stop", "graceful": graceful, "time": time.time()}))
        os.replace(tmp, run_dir / CONTROL_FILE)

    def logs(self, external_id: str, *, follow: bool = False, poll_seconds: float = 0.5) -> Iterator[str]:
        """Each attempt's log in turn (`logs/attempt-N.log`); with follow, tail until the job ends.
        Progress bars redraw with carriage returns: each redraw is a line here, as soon as it is drawn."""
        run_dir = self._run_dir(external_id)
        n, offset, announced = 1, 0, False
        while True:
            log = run_dir / "logs" / f"attempt-{n}.log"
            if log.exists():
                if not announced:
                    announced = True
                    yield f"── attempt {n} ──"
                data = _read_from(log, offset)
                whole = _complete(data)
                yield from _lines(data[:whole])
                offset += whole
            done = not follow or self.poll(external_id).state in TERMINAL_STATES
            next_exists = (run_dir / "logs" / f"attempt-{n + 1}.log").exists()
            if next_exists or done:
                if log.exists():
                    yield from _lines(_read_from(log, offset))
                if done and not next_exists:
                    return
                n, offset, announced = n + 1, 0, False
                continue
            time.sleep(poll_seconds)


def _complete(data: bytes) -> int:
    """How much of `data` can be shown now. Text after a last newline is a line still being written:
    it waits for the next read. A progress bar redraws as `\r` + the whole bar in one write, so text
    after a last carriage return is complete as it stands: shown now, not one redraw late."""
    last_newline, last_return = data.rfind(b"\n"), data.rfind(b"\r")
    return len(data) if last_return > last_newline else last_newline + 1


def _lines(data: bytes) -> list[str]:
    return [line for line in data.decode(errors="replace").splitlines() if line.strip()]


def _read_from(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()
