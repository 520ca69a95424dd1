"""SkyPilot managed jobs as a spotune backend: SkyPilot owns spot recovery, spotune observes.

submit -> sky.jobs.launch of the task from launch/sky_task.py; poll -> sky.jobs.queue_v2; cancel
-> sky.jobs.cancel(graceful=True) (SIGTERM on the node, the recipe checkpoints; graceful waits for
the MOUNT_CACHED upload); logs -> sky.jobs.tail_logs. Every call is bounded by a deadline
(launch/sky_sdk.py), so a watch tick never hangs on the API server or the controller.

queue_v2 is a snapshot, so the backend keeps what it has seen in <run_dir>/skypilot.json and turns
the sequence into attempts (launch/sky_attempts.py), each billed from provisioning start to
termination, plus one line for the jobs controller itself (launch/sky_controller.py). A
re-attached CLI reads the same file and continues from it.

Progress: the run command mirrors events.jsonl (kept in the checkpoint bucket) into the job log
with the prefix `[spotune-event] `; poll copies those lines into <run_dir>/events.jsonl. It reads
only what is new, by pages from the log's end back to the last event it already has (tail /
tail_offset, which SkyPilot serves by seeking from the end), and only while the job is RUNNING or
once it has ended: SkyPilot's log call waits on the server while the job is not running.

When the controller has stopped (it does 10 idle minutes after its last job), queue_v2 raises
ClusterNotUpError, which by SkyPilot's own rule means the job has ended. The job is then closed
from what was recorded (a terminal snapshot, or the recipe's `finished` event); otherwise poll
says in one line what is unknown and how to find out.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

from contract.backend import BackendError, DeviceReport, LaunchRequest, Observation
from contract.events import EVENTS_FILE, FINISHED, parse_line, read_new_lines
from contract.placement import Placement
from launch import sky_controller
from launch.event_log import merge_events
from launch.sky_attempts import (JOB_STATE, TERMINAL, add_lifecycle, attempt_from_json, job_detail, new_state,
                                 observe, reclassify, status_name)
from launch.sky_sdk import ControllerDown, Sdk
from launch.sky_task import SkyTaskError, build_task, render_task_yaml, secrets_from_environment

STATE_FILE = "skypilot.json"
QUEUE_FIELDS = ["job_id", "task_id", "job_name", "status", "recovery_count", "submitted_at",
                "start_at", "end_at", "last_recovered_at", "job_duration", "cloud", "region",
                "zone", "resources", "cluster_resources", "cluster_resources_full", "accelerators",
                "cluster_name_on_cloud", "details", "failure_reason"]
EVENTS_REFRESH_SECONDS = 60.0
LOG_PAGE_LINES = 1000
LOG_PAGES_MAX = 20  # past this much new output since the last read, the whole log is read once


class SkyPilotBackend:
    name = "skypilot"
    pricing = "catalog"
    options = ()
    poll_seconds = 20.0  # each poll is a request to the API server, and through it a cloud API
    max_nodes = None     # a task's num_nodes; clouds without MULTI_NODE are dropped in feasible()

    def __init__(self, state_dir: Path, *, sdk=None, events_refresh_seconds: float = EVENTS_REFRESH_SECONDS,
                 timeouts: Optional[dict[str, float]] = None):
        self._runs_dir = Path(state_dir) / "runs"
        self._sdk_module = sdk   # the `sky` module, or a test's fake of exactly the calls made here
        self.sdk = Sdk(lambda: self._sky, timeouts)
        self._events_refresh_seconds = events_refresh_seconds
        self._run_dirs: dict[str, Path] = {}

    @property
    def _sky(self):
        if self._sdk_module is None:
            import sky
            self._sdk_module = sky
        return self._sdk_module

    # -- protocol ----------------------------------------------------------------------------
    def device(self) -> DeviceReport:
        return DeviceReport(None, 0, None)  # priced from the catalog: no hardware of our own

    def feasible(self, spec, placements):
        """SkyPilot's own checks, per placement (launch/sky_feasibility.py)."""
        from launch.sky_feasibility import feasible

        try:
            return feasible(spec, placements)
        except SkyTaskError as e:
            raise BackendError(str(e)) from None

    def describe(self, request: LaunchRequest) -> str:
        return render_task_yaml(request)

    def submit(self, request: LaunchRequest) -> str:
        try:
            task, _skipped = build_task(request, secrets=secrets_from_environment(request.spec))
        except SkyTaskError as e:  # the ledger records a failed submit, with this reason
            raise BackendError(str(e)) from None
        launched_at = time.time()
        # (job_ids, controller handle[, credentials]), as sky's decoder returns it
        job_ids = self.sdk.request("launch", self._sky.jobs.launch, task, name=request.job_id)[0]
        job_ids = [job_ids] if isinstance(job_ids, int) else job_ids
        if not job_ids:
            raise BackendError("SkyPilot launch returned no managed job id")
        external_id = str(job_ids[0])
        request.run_dir.mkdir(parents=True, exist_ok=True)
        self._run_dirs[external_id] = request.run_dir
        # The placements the task can run (one num_nodes per task): what an attempt is priced from.
        state = new_state([p.to_json() for p in request.placements if p.num_nodes == task.num_nodes])
        state.update(managed_job_id=job_ids[0], job_id=request.job_id, launched_at=launched_at)
        self._save(external_id, state)
        return external_id

    def poll(self, external_id: str) -> Observation:
        state = self._load(external_id)
        if state.get("final") and state.get("events_final"):
            return self._observation(external_id, state)  # settled: nothing left to ask SkyPilot
        now = time.time()
        try:
            record = self._record(external_id)
        except ControllerDown as down:
            return self._without_controller(external_id, state, down)
        status = status_name(record.status)
        observe(state, record, status, now)
        state["last_seen"] = {"status": status, "at": now}
        if status in TERMINAL:
            state["final_detail"] = job_detail(status, record)
        self._refresh_events(external_id, state, status, now)
        self._refresh_controller(state, job_end=(record.end_at or now) if status in TERMINAL else None)
        self._save(external_id, state)
        return self._observation(external_id, state, JOB_STATE.get(status, "running"), job_detail(status, record))

    def cancel(self, external_id: str, *, graceful: bool = True) -> None:
        # SkyPilot SIGTERMs the job's process group on the node (skylet job_lib.cancel_jobs); the
        # recipe checkpoints on SIGTERM and exits 75. graceful=True makes SkyPilot wait until
        # MOUNT_CACHED has uploaded what was written (that checkpoint) before tearing down.
        self.sdk.request("cancel", self._sky.jobs.cancel, job_ids=[int(external_id)], graceful=graceful)

    def logs(self, external_id: str, *, follow: bool = False) -> Iterator[str]:
        yield from self.sdk.stream_log(int(external_id), follow=follow)

    # -- snapshots ---------------------------------------------------------------------------
    def _record(self, external_id: str):
        result = self.sdk.request("queue", self._sky.jobs.queue_v2, refresh=False, job_ids=[int(external_id)],
                                  fields=QUEUE_FIELDS)
        records = result[0] if isinstance(result, tuple) else result
        for record in records:
            if record.job_id == int(external_id):
                return record
        raise BackendError(f"SkyPilot has no managed job {external_id} (was it launched from another API server?)")

    def _observation(self, external_id: str, state: dict, job_state: Optional[str] = None,
                     detail: Optional[str] = None) -> Observation:
        if job_state is None:  # from the record alone
            final = state.get("final")
            job_state = JOB_STATE.get(final, "running") if final else "running"
            detail = state.get("final_detail")
        lines = state["attempts"] + ([state["controller"]] if state.get("controller") else [])
        events_path = self._run_dir(external_id) / EVENTS_FILE
        return Observation(state=job_state, attempts=tuple(attempt_from_json(a) for a in lines), detail=detail,
                           events_path=events_path if events_path.exists() else None)

    def _without_controller(self, external_id: str, state: dict, down: ControllerDown) -> Observation:
        """Close a job whose controller has stopped from what was recorded, or say what is unknown."""
        if not down.ended:
            raise down
        if state.get("final"):
            state["events_final"] = True  # its log went down with the controller
            self._save(external_id, state)
            return self._observation(external_id, state)
        running = next((a for a in state["attempts"] if a["ended_at"] is None), None)
        since = running["started_at"] if running else float("inf")
        finished = [t for t, event in state.get("lifecycle", []) if event == FINISHED and t >= since]
        if running is None or not finished:
            raise BackendError(self._unknown_end(state, external_id))
        why = ("closed at the recipe's `finished` event: SkyPilot's jobs controller had already stopped, "
               "so SkyPilot's own end time and status are not known")
        running.update(ended_at=finished[-1], end_exact=False, end_reason="finished", detail=why)
        state.update(final="SUCCEEDED", final_detail=why, events_final=True)
        self._refresh_controller(state, job_end=finished[-1])
        self._save(external_id, state)
        return self._observation(external_id, state)

    def _unknown_end(self, state: dict, external_id: str) -> str:
        seen = state.get("last_seen")
        when = "never" if seen is None else \
            f"{seen['status']} at {datetime.fromtimestamp(seen['at'], tz=timezone.utc):%Y-%m-%d %H:%M} UTC"
        running = next((a for a in state["attempts"] if a["ended_at"] is None), None)
        where = f" on {Placement.from_json(running['placement']).label(with_price=False)}" if running else ""
        lifecycle = state.get("lifecycle") or []
        last_event = f"the recipe's last lifecycle event is `{lifecycle[-1][1]}`" if lifecycle else \
            "no `finished` event from the recipe"
        return (f"SkyPilot's jobs controller has stopped, so managed job {external_id} has ended, but how is "
                f"unknown here: spotune last saw it {when}{where}, and {last_event}. `sky jobs queue --refresh` "
                f"restarts the controller (billed; it stops again after 10 idle minutes), then "
                f"`spotune resume {state.get('job_id', external_id)}` closes the job")

    # -- the controller's own line -----------------------------------------------------------
    def _refresh_controller(self, state: dict, job_end: Optional[float]) -> None:
        """Ask SkyPilot once while the job runs and once more when it has ended."""
        asked = state.get("controller_asked")
        if asked == "final" or (asked == "running" and job_end is None):
            return
        launched_at = state.get("launched_at") or min((a["started_at"] for a in state["attempts"]), default=None)
        if launched_at is None:
            return
        try:
            records = self.sdk.request("cost report", self._sky.cost_report)
            line = sky_controller.from_cost_report(records, launched_at, job_end)
        except BackendError:
            provider = Placement.from_json(state["placements"][0]).provider if state["placements"] else None
            line = provider and sky_controller.from_catalog(provider, launched_at, job_end)
        if line is not None or state.get("controller") is None:
            state["controller"] = line
        state["controller_asked"] = "running" if job_end is None else "final"

    # -- events via the job log --------------------------------------------------------------
    def _refresh_events(self, external_id: str, state: dict, status: str, now: float) -> None:
        terminal = status in TERMINAL
        if not state["attempts"] or (status != "RUNNING" and not terminal) or state.get("events_final"):
            return  # never while not RUNNING: SkyPilot's log call waits on the server for it to run
        fetched = state.get("events_fetched_at")
        if not terminal and fetched is not None and now - fetched < self._events_refresh_seconds:
            return
        try:
            lines = self._new_log_lines(int(external_id), state.get("log_anchor"))
        except ControllerDown:
            state["events_final"] = terminal
            return
        except BackendError:
            return  # a slow or failed read is tried again at the next refresh; status goes on
        events_path = merge_events(lines, self._run_dir(external_id) / EVENTS_FILE)
        state.update(events_fetched_at=now, events_final=terminal)
        new, state["events_offset"] = read_new_lines(events_path, state.get("events_offset", 0))
        events = [e for _, raw in new if (e := parse_line(raw)) is not None]
        if new:  # the newest event line as it appears in the log: where the next read may stop
            state["log_anchor"] = new[-1][1].decode("utf-8", "replace").strip()
        if add_lifecycle(state, events):
            reclassify(state)

    def _new_log_lines(self, job_id: int, anchor: Optional[str]) -> list[str]:
        """The log from the page holding the last event already read (all of it the first time)."""
        pages: list[list[str]] = []
        for k in range(LOG_PAGES_MAX):
            page = self.sdk.log_lines(job_id, tail=LOG_PAGE_LINES, tail_offset=k * LOG_PAGE_LINES)
            pages.append(page)
            if len(page) < LOG_PAGE_LINES or (anchor is not None and any(anchor in line for line in page)):
                return [line for older in reversed(pages) for line in older]
        return self.sdk.log_lines(job_id, tail=None)

    def fetch_events(self, external_id: str) -> Path:
        """Rebuild <run_dir>/events.jsonl from the `[spotune-event]` lines of the whole job log."""
        return merge_events(self.sdk.log_lines(int(external_id), tail=None), self._run_dir(external_id) / EVENTS_FILE)

    # -- state file --------------------------------------------------------------------------
    def _run_dir(self, external_id: str) -> Path:
        if external_id not in self._run_dirs:
            for path in sorted(self._runs_dir.glob(f"*/{STATE_FILE}")):
                try:
                    if str(json.loads(path.read_text()).get("managed_job_id")) == external_id:
                        self._run_dirs[external_id] = path.parent
                        break
                except (OSError, ValueError):
                    continue
            else:
                raise BackendError(f"no run directory under {self._runs_dir} knows SkyPilot managed job {external_id}")
        return self._run_dirs[external_id]

    def _load(self, external_id: str) -> dict:
        return json.loads((self._run_dir(external_id) / STATE_FILE).read_text())

    def _save(self, external_id: str, state: dict) -> None:
        path = self._run_dir(external_id) / STATE_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)
