"""SkyPilot's own answers about clouds: which ones `sky check` enabled, and what each can do.

Nothing here guesses a cloud's abilities: a placement is turned into the sky.Resources SkyPilot
would launch, and SkyPilot's `cloud.check_features_are_supported` says whether that cloud can
provide what the task needs (sky/clouds/<cloud>.py, _CLOUD_UNSUPPORTED_FEATURES). `sky` is
imported inside functions only: it takes a second to import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from contract.backend import first_line
from contract.placement import Placement

ENABLED_CLOUDS_TIMEOUT = 30.0  # seconds: a remote API server answers from its database


@dataclass(frozen=True)
class EnabledClouds:
    """Lower-case cloud names `sky check` enabled, for compute and for object storage."""

    compute: frozenset[str]
    storage: frozenset[str]


def enabled_clouds() -> EnabledClouds:
    """What `sky check` last enabled, as SkyPilot cached it. A local API server keeps its state in
    this machine's SkyPilot database (sky.global_user_state), read here without starting it; a
    remote one is asked (it reports compute only, so storage is assumed on the same clouds)."""
    from sky import global_user_state, skypilot_config
    from sky.clouds.cloud import CloudCapability
    from sky.server import common as server_common

    if server_common.is_api_server_local():
        workspace = skypilot_config.get_active_workspace()

        def cached(capability) -> frozenset[str]:
            return frozenset(str(c).lower() for c in global_user_state.get_cached_enabled_clouds(capability, workspace))

        return EnabledClouds(cached(CloudCapability.COMPUTE), cached(CloudCapability.STORAGE))
    import sky

    from launch.sky_sdk import within

    names = within(ENABLED_CLOUDS_TIMEOUT, "enabled_clouds", lambda: sky.get(sky.enabled_clouds()))
    compute = frozenset(str(n).lower() for n in names)
    return EnabledClouds(compute, compute)


def cloud_named(provider: str):
    """SkyPilot's cloud object for a provider name, or None where SkyPilot has no such cloud."""
    from sky.utils import registry

    try:
        return registry.CLOUD_REGISTRY.from_str(provider)
    except ValueError:
        return None


def resources_for(placement: Placement, job_recovery: Optional[dict] = None):
    """The sky.Resources SkyPilot launches for a placement: pinned to its cloud, region, instance
    type, GPUs and spot. Raises ValueError (or SkyPilot's ResourcesUnavailableError) where
    SkyPilot's catalog does not list it."""
    import sky

    return sky.Resources(infra=f"{placement.provider}/{placement.region}", instance_type=placement.instance_type,
                         accelerators={placement.gpu: placement.gpu_count}, use_spot=placement.spot,
                         job_recovery=job_recovery)


def unsupported(resources, features) -> Optional[str]:
    """None if the resources' cloud supports every feature (SkyPilot's own check), else why not, in one line."""
    from sky import exceptions

    try:
        resources.cloud.check_features_are_supported(resources, set(features))
    except exceptions.NotSupportedError as e:
        return _feature_reasons(resources, features) or first_line(e)
    return None


def launch_problem(resources, priced: bool = True, num_nodes: int = 1) -> Optional[str]:
    """Why SkyPilot could not launch these resources on `num_nodes` nodes, in one line, or None: a
    feature the resources need that the cloud lacks (MULTI_NODE too for several nodes, as SkyPilot's
    Task.get_required_cloud_features asks), or an offer its catalog does not list there. A sky.Resources builds
    for an instance type the region lacks, and fails only once priced; the optimizer's own check
    (cloud.get_feasible_launchable_resources) and a price for an hour find it here instead."""
    from sky import exceptions
    from sky.clouds import CloudImplementationFeatures

    features = set(resources.get_required_cloud_features())
    if num_nodes > 1:
        features.add(CloudImplementationFeatures.MULTI_NODE)
    missing = unsupported(resources, features)
    if missing:
        return f"{resources.cloud} cannot run it{f' on {num_nodes} nodes' if num_nodes > 1 else ''}: {missing}"
    try:
        found = resources.cloud.get_feasible_launchable_resources(resources, num_nodes=num_nodes)
        if not found.resources_list:
            hint = " ".join(str(found.hint or "").split())
            return f"not in SkyPilot's {resources.cloud} catalog there" + (f": {hint}" if hint else "")
        if priced:
            resources.get_cost(3600)
    except (ValueError, exceptions.ResourcesMismatchError, exceptions.ResourcesUnavailableError) as e:
        return f"not in SkyPilot's {resources.cloud} catalog: {first_line(e)}"
    return None


# (cloud, instance type, GPU, count, spot, nodes) -> (problem, regions listing it, can mount buckets). The
# catalog is fixed once sky is imported, so a verdict holds for the process.
_OFFER_VERDICTS: dict[tuple, tuple[Optional[str], frozenset[str], bool]] = {}


class OfferChecks:
    """SkyPilot's verdict on each offer (cloud, instance type, GPUs, spot, nodes), asked once, and the
    regions its catalog lists the offer in: a plan lists one offer in many regions, and the
    catalog checks cost tens of milliseconds each (GCP's accelerator-to-host check far more)."""

    def __init__(self):
        self._offers = _OFFER_VERDICTS

    def problem(self, p: Placement) -> Optional[str]:
        problem, regions, _ = self._offer(p)
        if problem is None and p.region not in regions:
            return f"not in SkyPilot's {cloud_named(p.provider)} catalog in {p.region}"
        return problem

    def can_mount_buckets(self, p: Placement) -> bool:
        return self._offer(p)[2]

    def _offer(self, p: Placement) -> tuple[Optional[str], frozenset[str], bool]:
        key = (p.provider, p.instance_type, p.gpu, p.gpu_count, p.spot, p.num_nodes)
        if key not in self._offers:
            self._offers[key] = self._check(p)
        return self._offers[key]

    @staticmethod
    def _check(p: Placement) -> tuple[Optional[str], frozenset[str], bool]:
        import sky
        from sky import exceptions

        try:
            resources = sky.Resources(infra=p.provider, instance_type=p.instance_type,
                                      accelerators={p.gpu: p.gpu_count}, use_spot=p.spot)
        except (ValueError, exceptions.ResourcesUnavailableError) as e:
            return f"not in SkyPilot's {cloud_named(p.provider)} catalog: {first_line(e)}", frozenset(), False
        problem = launch_problem(resources, priced=False, num_nodes=p.num_nodes)  # priced per region, below
        if problem:
            return problem, frozenset(), False
        regions = resources.cloud.regions_with_offering(p.instance_type, {p.gpu: p.gpu_count}, p.spot, None, None,
                                                        resources)
        return None, frozenset(r.name for r in regions), can_mount_buckets(resources)


def can_mount_buckets(resources) -> bool:
    from sky.clouds import CloudImplementationFeatures

    return unsupported(resources, {CloudImplementationFeatures.STORAGE_MOUNTING}) is None


def _feature_reasons(resources, features) -> Optional[str]:
    """SkyPilot's reason for each missing feature ("storage_mounting: Mounting object stores is not
    supported on Vast."): its NotSupportedError carries them as a table, this asks the same dict."""
    try:
        reasons = resources.cloud._unsupported_features_for_resources(resources, resources.region)
    except Exception:  # a private method: the table's first line is the fallback
        return None
    missing = [f for f in features if f in reasons]
    return "; ".join(f"{f.value}: {' '.join(str(reasons[f]).split())}" for f in missing) or None
