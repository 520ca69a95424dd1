"""SkyPilot queue_v2 snapshots -> attempts, each billed from provisioning start to termination.

A managed job's record is a snapshot (sky/jobs/state.py): `submitted_at` is set when the
controller starts launching the first cluster (STARTING); `last_recovered_at` when the job was
last submitted to a cluster, i.e. after provisioning; `job_duration` is the run time accumulated
before the current RUNNING stretch while RECOVERING, and that plus the current stretch otherwise
(sky/jobs/utils.py). The backend keeps the sequence it saw in a JSON state dict and turns it into
attempts:

- each RUNNING stretch (one value of last_recovered_at) is one attempt, priced as the request's
  placement for the resources it really ran on (cloud, region, spot, instance type and GPUs);
- the first attempt starts at `submitted_at` (provisioning is billed), a later one where the
  previous ended: SkyPilot tears the old cluster down and provisions the new one from there;
- RECOVERING ends the running attempt at its stretch start + the run time SkyPilot added to
  job_duration; a recovery that happened wholly between two polls is closed at the new stretch
  provisionally and made exact from the terminal snapshot;
- an interruption is a preemption or a crash by the recipe's own word: exit code 75 or a
  `preempted` event is a preemption, an `error` event or another exit code a crash (SkyPilot
  restarts both through RECOVERING, max_restarts_on_errors); none of these is a lost node.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Optional

from contract.backend import BackendError, ObservedAttempt
from contract.events import ERROR, EXIT_PREEMPTED, FINISHED, PREEMPTED
from contract.placement import Placement

JOB_STATE = {"PENDING": "pending", "SUBMITTED": "pending", "STARTING": "pending",
             "RUNNING": "running", "WINDING_DOWN": "running", "CANCELLING": "running",
             "RECOVERING": "recovering", "SUCCEEDED": "succeeded", "CANCELLED": "cancelled",
             "FAILED": "failed", "FAILED_SETUP": "failed", "FAILED_PRECHECKS": "failed",
             "FAILED_NO_RESOURCE": "failed", "FAILED_CONTROLLER": "failed"}
FAILURE_LABEL = {"FAILED": "recipe crashed", "FAILED_SETUP": "setup failed",
                 "FAILED_NO_RESOURCE": "no resources", "FAILED_PRECHECKS": "SkyPilot prechecks failed",
                 "FAILED_CONTROLLER": "SkyPilot jobs controller failed"}
END_REASON = {"SUCCEEDED": "finished", "CANCELLED": "cancelled"}
TERMINAL = (*END_REASON, *FAILURE_LABEL)
LIFECYCLE_EVENTS = (PREEMPTED, ERROR, FINISHED)


def status_name(status) -> str:
    return getattr(status, "value", status) or "PENDING"


def job_detail(status: str, record) -> Optional[str]:
    reason = record.failure_reason or record.details
    if status in FAILURE_LABEL:
        return f"{FAILURE_LABEL[status]}: {reason}" if reason else FAILURE_LABEL[status]
    return record.details


def new_state(placements: list[dict]) -> dict:
    return {"placements": placements, "attempts": [], "accumulated_seconds": 0.0, "final": None,
            "lifecycle": []}


# -- snapshots -> attempts ---------------------------------------------------------------------

def observe(state: dict, record, status: str, now: float) -> None:
    attempts = state["attempts"]
    last = attempts[-1] if attempts else None
    running = last if last and last["ended_at"] is None else None
    stretch = record.last_recovered_at if (record.last_recovered_at or 0) > 0 else None

    if stretch is not None and (last is None or last["stretch_start"] != stretch):
        if running:  # recovered between two polls: exact once the terminal snapshot comes
            _interrupt(state, running, stretch, exact=False, sky_details="recovered between two polls")
            state["accumulated_seconds"] = None
        attempts.extend(_new_attempts(state, record, stretch))
        running = attempts[-1]

    if running is not None and status == "RECOVERING":
        accumulated = state.get("accumulated_seconds")
        ran = None if record.job_duration is None or accumulated is None else record.job_duration - accumulated
        exact = ran is not None and ran >= 0
        _interrupt(state, running, running["stretch_start"] + ran if exact else now, exact, record.details)
    if status == "RECOVERING" and record.job_duration is not None:
        state["accumulated_seconds"] = record.job_duration  # exact while RECOVERING: the stored column
    if status in TERMINAL:
        if running is not None:
            running.update(ended_at=record.end_at or now, end_exact=bool(record.end_at),
                           end_reason=END_REASON.get(status, "failed"), detail=job_detail(status, record))
        _settle_unseen_recovery(attempts, record, stretch)
        state["final"] = status


def _new_attempts(state: dict, record, stretch: float) -> list[dict]:
    attempts = state["attempts"]
    n = len(attempts) + 1
    here = placement_of(state, record)
    if attempts:
        return [_attempt(n, here, attempts[-1]["ended_at"], stretch, record, state.get("accumulated_seconds"))]
    if not record.recovery_count:
        submitted = record.submitted_at or 0
        started = submitted if 0 < submitted <= stretch else stretch
        return [_attempt(n, here, started, stretch, record, 0.0)]
    # First seen after SkyPilot had already recovered it (a re-attach long after --detach): the
    # earlier attempts ran, but queue_v2 no longer says where.
    chosen = Placement.from_json(state["placements"][0])
    unseen = _attempt(n, chosen, record.submitted_at or stretch, None, record, None)
    unseen.update(ended_at=stretch, end_exact=False, end_reason="preempted", external_id=None,
                  detail=f"{record.recovery_count} recover{'y' if record.recovery_count == 1 else 'ies'} before "
                         "spotune first saw this job: where those attempts ran is unknown, so they are priced "
                         "as the chosen placement")
    return [unseen, _attempt(n + 1, here, stretch, stretch, record, None)]


def _attempt(n: int, placement: Placement, started_at: float, stretch: Optional[float], record,
             accumulated_before: Optional[float]) -> dict:
    return {"n": n, "placement": placement.to_json(), "started_at": started_at, "stretch_start": stretch,
            "accumulated_before": accumulated_before, "ended_at": None, "end_exact": False, "end_reason": None,
            "external_id": record.cluster_name_on_cloud, "detail": None}


def _interrupt(state: dict, attempt: dict, ended_at: float, exact: bool, sky_details: Optional[str]) -> None:
    attempt.update(ended_at=ended_at, end_exact=exact, interrupted=True, sky_details=sky_details)
    classify(attempt, state.get("lifecycle", []))


def _settle_unseen_recovery(attempts: list[dict], record, stretch: Optional[float]) -> None:
    """A terminal snapshot's job_duration gives the run time before the last stretch exactly, so a
    recovery seen only as a new stretch gets its real end (and the next attempt its real start)."""
    if len(attempts) < 2 or stretch is None or record.end_at is None or record.job_duration is None:
        return
    before, current = attempts[-2], attempts[-1]
    if before["end_exact"] or before.get("accumulated_before") is None or current["stretch_start"] != stretch:
        return
    ended = before["stretch_start"] + (record.job_duration - (record.end_at - stretch)) - before["accumulated_before"]
    if before["stretch_start"] < ended <= stretch:
        before.update(ended_at=ended, end_exact=True)
        current["started_at"] = ended


# -- preemption or crash -------------------------------------------------------------------------

_EXIT_CODES = re.compile(r"(?:exit codes?|return code list:?)\s*\[?([\d,\s]+)\]?", re.IGNORECASE)


def exit_codes(text: Optional[str]) -> list[int]:
    """'Job exited with exit code 1.', '... exit codes [1, 75]', 'return code list: [1]' -> codes."""
    match = _EXIT_CODES.search(text or "")
    return [int(c) for c in re.findall(r"\d+", match.group(1))] if match else []


def classify(attempt: dict, lifecycle: list) -> None:
    """Set an interrupted attempt's end reason from the recipe's exit code and its last lifecycle
    event in the attempt's window. Called again whenever more events arrive: the last events of an
    attempt reach the job log only when the next node re-emits the synced events file."""
    codes = exit_codes(attempt.get("sky_details"))
    window = [event for time, event in lifecycle if attempt["started_at"] <= time <= attempt["ended_at"]]
    last = window[-1] if window else None
    if EXIT_PREEMPTED in codes:
        reason, why = "preempted", f"preempted: the recipe checkpointed and exited {EXIT_PREEMPTED}"
    elif last == PREEMPTED:
        reason, why = "preempted", "preempted: the recipe checkpointed on SIGTERM"
    elif last == ERROR or codes:
        said = "its last event was `error`" if last == ERROR else f"it exited {', '.join(map(str, codes))}"
        reason, why = "failed", f"the recipe crashed ({said}); SkyPilot restarts it on a new cluster"
    else:
        reason, why = "preempted", "spot preemption or node failure"
    sky = attempt.get("sky_details")
    attempt.update(end_reason=reason, detail=f"{why}; SkyPilot: {sky}" if sky else why)


def add_lifecycle(state: dict, events: list[dict]) -> bool:
    """Keep the few events that say how an attempt ended; True if any is new."""
    lifecycle = state.setdefault("lifecycle", [])
    known = {tuple(item) for item in lifecycle}
    new = [(float(e["time"]), e["event"]) for e in events
           if e.get("event") in LIFECYCLE_EVENTS and isinstance(e.get("time"), (int, float))]
    new = [item for item in new if item not in known]
    lifecycle.extend([list(item) for item in new])
    lifecycle.sort()
    return bool(new)


def reclassify(state: dict) -> None:
    for attempt in state["attempts"]:
        if attempt.get("interrupted") and attempt["ended_at"] is not None:
            classify(attempt, state.get("lifecycle", []))


# -- where it ran --------------------------------------------------------------------------------

_LAUNCHED = re.compile(r"(\[spot\])?\((.*)\)")
_REQUESTED = re.compile(r"\d+x\[([^\]]*)\](?:\[([^\]]*)\])?")  # '1x[A10G:1][Spot]', '1x[A10G:1, L4:1][On-demand|Spot]'


def parse_cluster_resources(text: str) -> tuple[Optional[str], set[tuple[str, int]], set[bool]]:
    """(instance type, {(gpu, count)}, {spot?}) of a queue_v2 resources string.

    A live cluster: SkyPilot's resources_utils.format_resource, key=value elements plus the bare
    instance type, '1x[spot](gpus=A10G:1, cpus=4, mem=16, g5.xlarge, disk=256)'. A job whose
    cluster is gone reports what was requested (backend_utils.get_task_resources_str) instead:
    '1x[A10G:1][Spot]', or for several ordered resources '1x[A10G:1, L4:1][On-demand|Spot]'."""
    launched = _LAUNCHED.search(text)
    if launched:
        elements = [e.strip() for e in launched.group(2).split(",") if e.strip() and e.strip() != "..."]
        bare = [e for e in elements if "=" not in e]
        gpus = {_gpu(e.split("=", 1)[1]) for e in elements if e.startswith("gpus=")}
        return (bare[0] if bare else None), gpus, {bool(launched.group(1))}
    requested = _REQUESTED.search(text)
    if not requested:
        return None, set(), {"[spot]" in text.lower()}
    gpus = {_gpu(part) for part in requested.group(1).split(",") if ":" in part and not part.strip().startswith("CPU")}
    kinds = (requested.group(2) or "On-demand").split("|")
    return None, gpus, {kind.strip().lower() == "spot" for kind in kinds}


def _gpu(text: str) -> tuple[str, int]:
    name, _, count = text.strip().rpartition(":")
    return name, int(float(count))


def placement_of(state: dict, record) -> Placement:
    """The placement of the request that SkyPilot launched for this record: same cloud, region and
    spot, the same GPUs, and the same instance type where the record names one. GPUs count as much
    as the instance: on GCP one n1 host type carries T4:2 or V100:1, at different prices."""
    provider, region = (record.cloud or "").lower(), record.region
    text = record.cluster_resources_full or record.cluster_resources or ""
    instance_type, gpus, spot_options = parse_cluster_resources(text)
    if record.accelerators:
        gpus = {(name, int(count)) for name, count in record.accelerators.items()}
    # SkyPilot tries the ordered resources in the request's order, so where the record is
    # ambiguous (several requested GPUs) the first that fits is the one it launched first.
    for p in map(Placement.from_json, state.get("placements", [])):
        if (p.provider, p.region) != (provider, region) or p.spot not in spot_options:
            continue
        if gpus and (p.gpu, p.gpu_count) not in gpus:
            continue
        if instance_type and p.instance_type and p.instance_type != instance_type:
            continue
        return p
    gpu_text = ",".join(f"{g}:{c}" for g, c in sorted(gpus)) or "no GPU"
    ran_on = f"{provider}/{region} {instance_type or gpu_text}" + (f" ({gpu_text})" if instance_type and gpus else "")
    raise BackendError(f"SkyPilot ran managed job {record.job_id} on {ran_on}{' spot' if any(spot_options) else ''}, "
                       "which matches none of the placements it was launched with: cannot price the attempt")


# -- out -------------------------------------------------------------------------------------------

def _utc(ts: Optional[float]) -> Optional[datetime]:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


def attempt_from_json(a: dict) -> ObservedAttempt:
    # A skypilot.json written before attempts nested their placement has its fields inline.
    placement = Placement.from_json(a.get("placement", a))
    return ObservedAttempt(n=a["n"], placement=placement, started_at=_utc(a["started_at"]),
                           ended_at=_utc(a["ended_at"]), end_reason=a["end_reason"],
                           external_id=a.get("external_id"), detail=a.get("detail"),
                           kind=a.get("kind", "training"))
