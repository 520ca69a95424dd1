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

from contract.backend import (TERMINAL_STATES, BackendError, DeviceReport, LaunchRequest, Observation,
                              ObservedAttempt)
from contract.events import EVENTS_FILE, read_jsonl
from contract.placement import Placement
from launch.supervisor import ATTEMPTS_FILE, CONFIG_FILE, CONTROL_FILE, LOCK_FILE, SupervisorConfig

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


class LocalBackend:
    name = "local"
    pricing = "hourly"
    options = ("simulate_preemptions", "hard", "seed", "restart_seconds")
    poll_seconds = 1.0  # a local file read: cheap

    def __init__(self, state_dir: Optional[Path] = None, *, restart_seconds: float = 3.0,
                 simulate_preemptions: int = 0, hard: bool = False, seed: int = 0,
                 max_consecutive_crashes: int = 3, grace_seconds: float = 120.0, python: Optional[str] = None):
        # The run dir comes with each request, and a local job's external id is its run dir, so
        # the state dir is not needed here; it is accepted for the one constructor shape.
        if simulate_preemptions < 0:
            raise BackendError("--simulate-preemptions must be 0 or more")
        self.restart_seconds = restart_seconds
        self.simulate_preemptions = simulate_preemptions
        self.hard = hard
        self.seed = seed
        self.max_consecutive_crashes = max_consecutive_crashes
        self.grace_seconds = grace_seconds
        self.python = python or sys.executable

    def device(self) -> DeviceReport:
        return DeviceReport(*detect_gpu())

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
        config = SupervisorConfig(
            job_id=request.job_id, spec_path=str(spec_copy), placement=request.placements[0],
            python=self.python, env=dict(request.env), restart_seconds=self.restart_seconds,
            simulate_preemptions=self.simulate_preemptions, hard=self.hard, seed=self.seed,
            max_consecutive_crashes=self.max_consecutive_crashes, grace_seconds=self.grace_seconds)
        config.save(run_dir)

        # Lock before starting: the supervisor inherits the locked descriptor, so from the
        # moment submit returns, "lock free" can only mean "supervisor gone".
        lock_fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
        try:
            with open(run_dir / "logs" / "supervisor.log", "ab") as log:
                proc = subprocess.Popen([self.python, "-m", "launch.supervisor", str(run_dir)],
                                        cwd=run_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(lock_fd,))
            os.write(lock_fd, f"{proc.pid}\n".encode())
        finally:
            os.close(lock_fd)
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
        job_end = next((r for r in reversed(records) if r.get("record") == "job_end"), None)
        died = job_end is None and not alive

        attempts = []
        for n in sorted(starts):
            start, end = starts[n], ends.get(n)
            if end is not None:
                ended_at, reason, detail = _utc(end["time"]), end["reason"], end.get("detail")
            elif died:
                ended_at, reason, detail = _utc(self._last_activity(run_dir, n)), "failed", "supervisor died"
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

    @staticmethod
    def _last_activity(run_dir: Path, n: int) -> float:
        """When a dead supervisor's open attempt last did anything: stable across polls."""
        times = [p.stat().st_mtime for p in (run_dir / "logs" / f"attempt-{n}.log", run_dir / EVENTS_FILE)
                 if p.exists()]
        return max(times) if times else (run_dir / ATTEMPTS_FILE).stat().st_mtime

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
        Progress bars redraw with carriage returns: each redraw is a line here."""
        run_dir = self._run_dir(external_id)
        n, offset, announced = 1, 0, False
        while True:
            log = run_dir / "logs" / f"attempt-{n}.log"
            if log.exists():
                if not announced:
                    announced = True
                    yield f"── attempt {n} ──"
                data = _read_from(log, offset)
                whole = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1  # a partial line waits for the next read
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


def _lines(data: bytes) -> list[str]:
    return [line for line in data.decode(errors="replace").splitlines() if line.strip()]


def _read_from(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()
