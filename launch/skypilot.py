"""SkyPilot managed jobs as a spotune backend: SkyPilot owns spot recovery, spotune observes.

submit -> sky.jobs.launch of the task from launch/sky_task.py; poll -> sky.jobs.queue_v2; cancel
-> sky.jobs.cancel(graceful=True) (SIGTERM on the node, the recipe checkpoints; graceful waits for
the MOUNT_CACHED upload); logs -> sky.jobs.tail_logs. Each SDK call returns a request id that
sky.get resolves.

queue_v2 is a snapshot (status, last_recovered_at, accumulated job_duration, where it runs now),
so the backend keeps what it has seen in <run_dir>/skypilot.json and turns the sequence of
snapshots into attempts: each RUNNING stretch (one value of last_recovered_at) is an attempt on
the cloud/region/instance it really ran on, priced as the request's placement for those resources
(SkyPilot launches only the resources it was given, and the orchestrator gives a placement for
each, at the plan's catalog price, so no catalog is read here); RECOVERING closes it as
preempted, at start + the run seconds SkyPilot added to job_duration; a terminal status closes
the job. A re-attached CLI reads the same file and continues the numbering.

Progress: the run command mirrors events.jsonl (kept in the checkpoint bucket) into the job log
with the prefix `[spotune-event] `; poll collects those lines from sky.jobs.tail_logs into
<run_dir>/events.jsonl. The log route needs no cloud storage credentials or CLIs on this
machine; after a recovery the new node re-emits the whole synced file, so duplicates are dropped.
"""
from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

from contract.backend import (TERMINAL_STATES, BackendError, DeviceReport, LaunchRequest, Observation,
                              ObservedAttempt, first_line)
from contract.events import EVENTS_FILE
from contract.placement import Placement
from launch.event_log import merge_events
from launch.sky_task import SkyTaskError, build_task, render_task_yaml, secrets_from_environment

STATE_FILE = "skypilot.json"
QUEUE_FIELDS = ["job_id", "task_id", "job_name", "status", "recovery_count", "submitted_at",
                "start_at", "end_at", "last_recovered_at", "job_duration", "cloud", "region",
                "zone", "cluster_resources", "cluster_resources_full", "accelerators",
                "cluster_name_on_cloud", "details", "failure_reason"]
JOB_STATE = {"PENDING": "pending", "SUBMITTED": "pending", "STARTING": "pending",
             "RUNNING": "running", "WINDING_DOWN": "running", "CANCELLING": "running",
             "RECOVERING": "recovering", "SUCCEEDED": "succeeded", "CANCELLED": "cancelled",
             "FAILED": "failed", "FAILED_SETUP": "failed", "FAILED_PRECHECKS": "failed",
             "FAILED_NO_RESOURCE": "failed", "FAILED_CONTROLLER": "failed"}
FAILURE_LABEL = {"FAILED": "recipe crashed", "FAILED_SETUP": "setup failed",
                 "FAILED_NO_RESOURCE": "no resources", "FAILED_PRECHECKS": "SkyPilot prechecks failed",
                 "FAILED_CONTROLLER": "SkyPilot jobs controller failed"}
END_REASON = {"SUCCEEDED": "finished", "CANCELLED": "cancelled"}
EVENTS_REFRESH_SECONDS = 60.0


class SkyPilotBackend:
    name = "skypilot"
    pricing = "catalog"
    options = ()
    poll_seconds = 20.0  # each poll is a request to the API server, and through it a cloud API

    def __init__(self, state_dir: Path, *, sdk=None, events_refresh_seconds: float = EVENTS_REFRESH_SECONDS):
        self._runs_dir = Path(state_dir) / "runs"
        self._sdk = sdk          # the `sky` module, or a test's fake of exactly the calls made here
        self._events_refresh_seconds = events_refresh_seconds
        self._run_dirs: dict[str, Path] = {}

    # -- the SDK boundary --------------------------------------------------------------------
    @property
    def _sky(self):
        if self._sdk is None:
            import sky
            self._sdk = sky
        return self._sdk

    def _request(self, what: str, fn, *args, **kwargs):
        """Send one SDK request and wait for its result; any failure becomes one line."""
        try:
            return self._sky.get(fn(*args, **kwargs))
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"SkyPilot {what} failed: {first_line(e)}") from None

    # -- protocol ----------------------------------------------------------------------------
    def device(self) -> DeviceReport:
        return DeviceReport(None, 0, None)  # priced from the catalog: no hardware of our own

    def describe(self, request: LaunchRequest) -> str:
        return render_task_yaml(request)

    def submit(self, request: LaunchRequest) -> str:
        try:
            task, _skipped = build_task(request, secrets=secrets_from_environment(request.spec))
        except SkyTaskError as e:  # the ledger records a failed submit, with this reason
            raise BackendError(str(e)) from None
        # (job_ids, controller handle[, credentials]), as sky's decoder returns it
        job_ids = self._request("launch", self._sky.jobs.launch, task, name=request.job_id)[0]
        job_ids = [job_ids] if isinstance(job_ids, int) else job_ids
        if not job_ids:
            raise BackendError("SkyPilot launch returned no managed job id")
        external_id = str(job_ids[0])
        request.run_dir.mkdir(parents=True, exist_ok=True)
        self._run_dirs[external_id] = request.run_dir
        self._save(external_id, {
            "managed_job_id": job_ids[0], "job_id": request.job_id,
            "placements": [p.to_json() for p in request.placements],
            "attempts": [], "accumulated_seconds": 0.0, "events_fetched_at": None, "final": None})
        return external_id

    def poll(self, external_id: str) -> Observation:
        state = self._load(external_id)
        record = self._record(external_id)
        now = time.time()
        status = _status_name(record.status)
        self._observe(state, record, status, now)
        job_state = JOB_STATE.get(status, "running")
        detail = _job_detail(status, record)
        events_path = self._refresh_events(external_id, state, now, force=job_state in TERMINAL_STATES)
        self._save(external_id, state)
        return Observation(state=job_state, attempts=tuple(_attempt_from_json(a) for a in state["attempts"]),
                           detail=detail, events_path=events_path)

    def cancel(self, external_id: str, *, graceful: bool = True) -> None:
        # SkyPilot SIGTERMs the job's process group on the node (skylet job_lib.cancel_jobs); the
        # recipe checkpoints on SIGTERM and exits 75. graceful=True makes SkyPilot wait until
        # MOUNT_CACHED has uploaded what was written (that checkpoint) before tearing down.
        self._request("cancel", self._sky.jobs.cancel, job_ids=[int(external_id)], graceful=graceful)

    def logs(self, external_id: str, *, follow: bool = False) -> Iterator[str]:
        try:
            chunks = self._sky.jobs.tail_logs(job_id=int(external_id), follow=follow, preload_content=False)
            yield from _lines(chunks)
        except Exception as e:
            raise BackendError(f"SkyPilot logs failed: {first_line(e)}") from None

    # -- snapshots -> attempts ---------------------------------------------------------------
    def _record(self, external_id: str):
        result = self._request("queue", self._sky.jobs.queue_v2, refresh=False, job_ids=[int(external_id)],
                               fields=QUEUE_FIELDS)
        records = result[0] if isinstance(result, tuple) else result
        for record in records:
            if record.job_id == int(external_id):
                return record
        raise BackendError(f"SkyPilot has no managed job {external_id} (was it launched from another API server?)")

    def _observe(self, state: dict, record, status: str, now: float) -> None:
        attempts = state["attempts"]
        last = attempts[-1] if attempts else None
        open_attempt = last if last and last["ended_at"] is None else None
        stretch = record.last_recovered_at if (record.last_recovered_at or 0) > 0 else None

        if stretch is not None and (last is None or last["stretch_start"] != stretch):
            # A RUNNING stretch we have not seen yet; any open one ended when it began (a
            # recovery that happened entirely between two polls).
            if open_attempt:
                _close(open_attempt, stretch, "preempted", "recovered between polls")
                state["accumulated_seconds"] = None  # unknown from here: ends fall back to poll times
            attempts.append(self._new_attempt(state, record, len(attempts) + 1, stretch))
            open_attempt = attempts[-1]

        if open_attempt is None:
            pass
        elif status == "RECOVERING":
            accumulated = state.get("accumulated_seconds")
            ran = (record.job_duration - accumulated) if (record.job_duration and accumulated is not None) else None
            end = open_attempt["started_at"] + ran if ran and ran > 0 else now
            _close(open_attempt, end, "preempted", record.details or "spot preemption or node failure; SkyPilot is recovering")
            state["accumulated_seconds"] = record.job_duration if accumulated is not None else None
        elif status in END_REASON or status in FAILURE_LABEL:
            _close(open_attempt, record.end_at or now, END_REASON.get(status, "failed"), _job_detail(status, record))
        if status in END_REASON or status in FAILURE_LABEL:
            state["final"] = status

    def _new_attempt(self, state: dict, record, n: int, started_at: float) -> dict:
        placement = _placement_of(state, record)
        return {"n": n, "placement": placement.to_json(), "started_at": started_at, "stretch_start": started_at,
                "ended_at": None, "end_reason": None, "external_id": record.cluster_name_on_cloud, "detail": None}

    # -- events via the job log --------------------------------------------------------------
    def _refresh_events(self, external_id: str, state: dict, now: float, force: bool) -> Optional[Path]:
        events_path = self._run_dir(external_id) / EVENTS_FILE
        fetched_at = state.get("events_fetched_at")
        due = fetched_at is None or now - fetched_at >= self._events_refresh_seconds
        if state["attempts"] and (due or (force and not state.get("events_final"))):
            self.fetch_events(external_id)
            state["events_fetched_at"] = now
            state["events_final"] = force
        return events_path if events_path.exists() else None

    def fetch_events(self, external_id: str) -> Path:
        """Rebuild <run_dir>/events.jsonl from the `[spotune-event]` lines of the job log."""
        return merge_events(self.logs(external_id, follow=False), self._run_dir(external_id) / EVENTS_FILE)

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


def _status_name(status) -> str:
    return getattr(status, "value", status) or "PENDING"


def _job_detail(status: str, record) -> Optional[str]:
    reason = record.failure_reason or record.details
    if status in FAILURE_LABEL:
        return f"{FAILURE_LABEL[status]}: {reason}" if reason else FAILURE_LABEL[status]
    return record.details


def _close(attempt: dict, ended_at: float, reason: str, detail: Optional[str]) -> None:
    attempt["ended_at"] = ended_at
    attempt["end_reason"] = reason
    if detail:
        attempt["detail"] = f"{attempt['detail']}; {detail}" if attempt.get("detail") else detail


_RESOURCES = re.compile(r"(\[spot\])?\((.*)\)")
_REQUESTED_GPU = re.compile(r"\[([^\]:\[]+):(\d+)\]")  # '[A10G:1]' in '1x[A10G:1][Spot]'


def _parse_cluster_resources(text: str) -> tuple[Optional[str], bool]:
    """'1x[spot](gpus=A10G:1, cpus=4, mem=16, g5.xlarge, disk=256)' -> ('g5.xlarge', True).

    The format is SkyPilot's resources_utils.format_resource: key=value elements plus the bare
    instance type. A job whose cluster is gone reports the requested resources instead,
    '1x[A10G:1][Spot]': no instance type, and Spot capitalised."""
    match = _RESOURCES.search(text)
    if not match:
        return None, "[spot]" in text.lower()
    bare = [e.strip() for e in match.group(2).split(",") if e.strip() and "=" not in e and e.strip() != "..."]
    return (bare[0] if bare else None), bool(match.group(1))


def _placement_of(state: dict, record) -> Placement:
    """The placement of the request that SkyPilot launched for this record: same cloud, region
    and spot, and the same instance type (or, where the snapshot names none, GPU and count)."""
    provider, region = (record.cloud or "").lower(), record.region
    text = record.cluster_resources_full or record.cluster_resources or ""
    instance_type, spot = _parse_cluster_resources(text)
    accelerators = record.accelerators or {}
    if accelerators:
        gpu, count = next(iter(accelerators.items()))
    else:
        requested = _REQUESTED_GPU.search(text)
        gpu, count = (requested.group(1), requested.group(2)) if requested else (None, 0)
    for p in map(Placement.from_json, state.get("placements", [])):
        if (p.provider, p.region, p.spot) != (provider, region, spot):
            continue
        if instance_type and p.instance_type:
            if p.instance_type == instance_type:
                return p
        elif (p.gpu, p.gpu_count) == (gpu, int(count)):
            return p
    ran_on = f"{provider}/{region} {instance_type or (f'{gpu}:{count}' if gpu else 'unknown resources')}"
    raise BackendError(f"SkyPilot ran managed job {record.job_id} on {ran_on}{' spot' if spot else ''}, "
                       "which matches none of the placements it was launched with: cannot price the attempt")


def _utc(ts: Optional[float]) -> Optional[datetime]:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


def _attempt_from_json(a: dict) -> ObservedAttempt:
    # A skypilot.json written before attempts nested their placement has its fields inline.
    placement = Placement.from_json(a.get("placement", a))
    return ObservedAttempt(n=a["n"], placement=placement, started_at=_utc(a["started_at"]),
                           ended_at=_utc(a["ended_at"]), end_reason=a["end_reason"],
                           external_id=a["external_id"], detail=a["detail"])


def _lines(chunks) -> Iterator[str]:
    pending = ""
    for chunk in chunks:
        if chunk is None:
            break
        pending += chunk
        *complete, pending = pending.split("\n")
        yield from complete
    if pending:
        yield pending
