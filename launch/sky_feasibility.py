"""Which of a plan's placements SkyPilot can launch this job on, each other one with SkyPilot's reason.

Asked before a job is recorded (Backend.feasible), so a plan for the skypilot backend holds only
what can start: a launch whose every resource is blocked ends in FAILED_NO_RESOURCE after the
jobs controller VM has started, and is billed. A placement is launchable when
- SkyPilot knows its cloud, and `sky check` enabled that cloud;
- SkyPilot's catalog lists it (sky.Resources builds);
- its cloud supports what the resources need (spot, ...), by SkyPilot's own
  check_features_are_supported;
- its checkpoints have somewhere durable to go (launch/sky_store.py): the cloud mounts the
  bucket and the store's cloud is enabled for storage, or the recipe can write to the store
  directly because its credentials are listed in sky.secrets and set here.
SkyPilot's managed jobs also ship the code and the data through a bucket of their own, so a
cloud with object storage must be enabled whatever the placement.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

from contract.backend import Feasibility
from contract.placement import Placement
from launch.sky_clouds import EnabledClouds, OfferChecks, cloud_named, enabled_clouds
from launch.sky_store import STORE_CLOUD, base_url, direct_write_problem, scheme_of


def feasible(spec, placements: Sequence[Placement], *, clouds: Optional[EnabledClouds] = None,
             environ: Optional[Mapping[str, str]] = None) -> Feasibility:
    """Every placement, launchable or rejected with the reason, in the given order. `clouds`: what
    `sky check` enabled (read from SkyPilot's state when not given); `environ`: where the store's
    credentials would be read at launch."""
    from launch.sky_task import catalog_fetch_is_one_line

    with catalog_fetch_is_one_line():
        return _feasible(spec, placements, enabled_clouds() if clouds is None else clouds,
                         os.environ if environ is None else environ)


def _feasible(spec, placements, clouds: EnabledClouds, environ: Mapping[str, str]) -> Feasibility:
    whole_job = _whole_job_problem(clouds)
    store_cloud = STORE_CLOUD[scheme_of(base_url(spec, "job"))]
    checks = _Checks(clouds, mountable=store_cloud in clouds.storage, store_cloud=store_cloud,
                     direct_problem=direct_write_problem(spec, environ))
    launchable, rejected = [], []
    for p in placements:
        reason = whole_job or checks.reason(p)
        if reason is None:
            launchable.append(p)
        else:
            rejected.append((p, reason))
    return Feasibility(tuple(launchable), tuple(rejected))


def _whole_job_problem(clouds: EnabledClouds) -> Optional[str]:
    if not clouds.compute:
        return "SkyPilot has no cloud enabled: run `sky check`"
    if not clouds.storage:
        return ("SkyPilot's managed jobs upload the code and data through a bucket, and no cloud with object "
                "storage is enabled: run `sky check` for AWS, GCP, Azure or another store")
    return None


class _Checks:
    """Per placement: its cloud, its offer (asked once per offer, launch/sky_clouds.py), its store."""

    def __init__(self, clouds: EnabledClouds, *, mountable: bool, store_cloud: str, direct_problem: Optional[str]):
        self.clouds = clouds
        self.mountable = mountable
        self.store_cloud = store_cloud
        self.direct_problem = direct_problem
        self.offers = OfferChecks()

    def reason(self, p: Placement) -> Optional[str]:
        cloud = cloud_named(p.provider)
        if cloud is None:
            return f"SkyPilot has no cloud named '{p.provider}'"
        if str(cloud).lower() not in self.clouds.compute:
            return f"{cloud} is not enabled in SkyPilot (run `sky check {p.provider}`)"
        problem = self.offers.problem(p)
        if problem:
            return problem
        mounts = self.offers.can_mount_buckets(p)
        if (self.mountable and mounts) or self.direct_problem is None:
            return None
        why_not_mounted = (f"{cloud} cannot mount a bucket" if not mounts else
                           f"the checkpoint store's cloud ({self.store_cloud}) is not enabled for storage in SkyPilot")
        return f"{why_not_mounted}; {self.direct_problem}"
