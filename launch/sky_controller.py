"""What SkyPilot's jobs controller costs over one job: its own ledger line (attempt 0, kind controller).

Managed jobs run under a controller VM (sky/jobs/constants.py: CONTROLLER_RESOURCES 4+ vCPUs, 4x
memory, 50 GB disk; CONTROLLER_AUTOSTOP stops it 10 idle minutes after its last job). A job is
charged the controller's time from its own launch (which starts the controller if it was stopped)
until the controller stopped after it; while the controller is still up, until the job's end plus
the autostop window, which is what it will run if no other job keeps it up.

The price comes from SkyPilot itself where it has it: `sky.cost_report()` lists the controller
cluster (name `sky-jobs-controller-<user hash>`) with SkyPilot's own total cost over its up time
and its usage intervals. Where the API server cannot answer, SkyPilot's catalog prices the
instance it would pick for CONTROLLER_RESOURCES on the cloud of the job's chosen placement,
on demand, and the line says it is that estimate. Disk is not priced (SkyPilot prices none).
Concurrent jobs share one controller and each is charged its whole window.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Optional

from contract.backend import CONTROLLER_ATTEMPT
from contract.placement import Placement

CONTROLLER_NAME_PREFIX = "sky-jobs-controller-"
# sky/jobs/constants.py; read from there where sky is importable (see `_defaults`).
DEFAULT_RESOURCES = {"cpus": "4+", "memory": "4x", "disk_size": 50}
DEFAULT_IDLE_MINUTES = 10
_PRICE_QUANTUM = Decimal("0.000001")


def _defaults() -> tuple[dict, int]:
    try:
        from sky.jobs import constants
    except ImportError:
        return DEFAULT_RESOURCES, DEFAULT_IDLE_MINUTES
    return dict(constants.CONTROLLER_RESOURCES), int(constants.CONTROLLER_AUTOSTOP.get("idle_minutes", DEFAULT_IDLE_MINUTES))


def _line(placement: Placement, started_at: float, ended_at: Optional[float], source: str, detail: str) -> dict:
    return {"n": CONTROLLER_ATTEMPT, "kind": "controller", "placement": placement.to_json(), "started_at": started_at,
            "ended_at": ended_at, "end_reason": None if ended_at is None else "finished", "external_id": None,
            "source": source, "detail": detail}


def from_cost_report(records: list[dict], launched_at: float, job_end: Optional[float]) -> Optional[dict]:
    """The controller line from SkyPilot's cost report, or None if it lists no jobs controller."""
    controllers = [r for r in records or [] if str(r.get("name", "")).startswith(CONTROLLER_NAME_PREFIX)]
    if not controllers:
        return None
    record = max(controllers, key=lambda r: (_overlaps(r, launched_at), r.get("launched_at") or 0))
    duration, total = float(record.get("duration") or 0), float(record.get("total_cost") or 0)
    if duration <= 0 or total <= 0:
        return None
    price = (Decimal(str(total)) * 3600 / Decimal(str(duration))).quantize(_PRICE_QUANTUM)
    resources = record.get("resources")
    instance_type = getattr(resources, "instance_type", None) or _instance_of(record.get("resources_str") or "")
    placement = Placement(provider=str(record.get("cloud") or "-").lower(), region=str(record.get("region") or "-"),
                          gpu="CPU", gpu_count=0, spot=bool(getattr(resources, "use_spot", False)),
                          price_per_hour=price, instance_type=instance_type)
    _, idle_minutes = _defaults()
    ended_at, how = _end(record, launched_at, job_end, idle_minutes)
    return _line(placement, launched_at, ended_at, "sky.cost_report",
                 f"SkyPilot jobs controller {record.get('name')} ({record.get('resources_str') or instance_type}), "
                 f"priced by SkyPilot's cost report; {how}")


def from_catalog(provider: str, launched_at: float, job_end: Optional[float]) -> Optional[dict]:
    """An estimate from SkyPilot's catalog: the instance it picks for the controller's default
    resources on `provider`, in its cheapest region. None where the catalog has no such instance."""
    try:
        from sky import catalog
    except ImportError:
        return None
    resources, idle_minutes = _defaults()
    try:
        instance_type = catalog.get_default_instance_type(cpus=resources["cpus"], memory=resources["memory"],
                                                          clouds=provider)
        if instance_type is None:
            return None
        price = Decimal(str(catalog.get_hourly_cost(instance_type, use_spot=False, region=None, zone=None,
                                                    clouds=provider))).quantize(_PRICE_QUANTUM)
    except Exception:  # an unknown cloud, a catalog that cannot be read: no estimate rather than a wrong one
        return None
    placement = Placement(provider=provider, region="-", gpu="CPU", gpu_count=0, spot=False,
                          price_per_hour=price, instance_type=instance_type)
    ended_at = None if job_end is None else job_end + idle_minutes * 60
    return _line(placement, launched_at, ended_at, "catalog",
                 f"estimated: SkyPilot's cost report was unavailable, so this is the instance SkyPilot picks for its "
                 f"jobs controller ({resources['cpus']} vCPUs, {resources['memory']} memory) on {provider}, "
                 f"from its catalog; until the job's end + {idle_minutes} min autostop")


def _overlaps(record: dict, launched_at: float) -> bool:
    return any((end is None or end >= launched_at) for _start, end in _intervals(record))


def _intervals(record: dict) -> list[tuple[float, Optional[float]]]:
    return [(float(start), None if end is None else float(end))
            for start, end in (record.get("usage_intervals") or []) if start is not None]


def _end(record: dict, launched_at: float, job_end: Optional[float], idle_minutes: int) -> tuple[Optional[float], str]:
    if job_end is None:
        return None, "open while the job runs"
    for start, end in _intervals(record):
        if start <= job_end and (end is None or end >= job_end):
            if end is not None:
                return max(end, launched_at), "until the controller stopped after the job"
            break
    return job_end + idle_minutes * 60, f"until the job's end + {idle_minutes} min autostop (still up when last read)"


def _instance_of(resources_str: str) -> Optional[str]:
    """'1x(cpus=4, mem=16, m6i.xlarge, disk=50)' -> 'm6i.xlarge' (resources_utils.format_resource)."""
    inside = resources_str.partition("(")[2].rpartition(")")[0]
    bare = [e.strip() for e in inside.split(",") if e.strip() and "=" not in e and e.strip() != "..."]
    return bare[0] if bare else None
