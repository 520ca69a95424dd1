"""The SkyPilot task for a job: ranked placements -> ordered resources, checkpoint store, setup, run.

One builder serves both `spotune launch --backend skypilot --dry-run` (render_task_yaml) and the
real submit (SkyPilotBackend), so the YAML a user reads is the task that would be launched, less
secret values. `sky` is imported inside functions only: it takes a second to import.

What runs on the node:
- workdir: this spotune checkout (synced by SkyPilot, honouring .gitignore), installed with the
  `train` extra in setup, so the recipe on the node is exactly the code planned with here;
- the data file, in a folder of its own (SkyPilot's managed jobs copy a folder to the node, but
  would mount a single file, which RunPod and Vast cannot: sky/utils/controller_utils.py);
- the request's node spec, with only data.path changed to where the data lands, in the env var
  SPOTUNE_SPEC_YAML (no secrets in it), written to a file by `run`;
- the checkpoint store <checkpoint url>/<spotune job id> (launch/sky_store.py), mounted or
  written directly; the scripts are launch/sky_scripts.py, the exit statuses launch/sky_node.py;
- events.jsonl mirrored into the job's log with the prefix `[spotune-event] `, which is how the
  backend reads progress (see launch/skypilot.py);
- a placement spanning N nodes makes a task of num_nodes N (the resources stay per node): the run
  starts torchrun on every node, rendezvousing at the head (launch/sky_scripts.py).
"""
from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import yaml

from contract.backend import LaunchRequest, first_line
from contract.errors import UserError
from contract.placement import Placement
from launch.sky_clouds import EnabledClouds, can_mount_buckets, cloud_named, enabled_clouds, launch_problem, resources_for
from launch.sky_node import RECOVER_ON_EXIT_CODES
from launch.sky_scripts import run_commands, setup_commands
from launch.sky_store import MOUNT_POINT, STORE_CLOUD, JobStore, base_url, direct_write_problem, scheme_of

NODE_DATA_DIR = "/spotune-data"
STAGED_DATA_DIR = "sky-data"  # <state>/sky-data/<key>/<file>: the folder SkyPilot uploads
# Regions kept per (cloud, instance type, spot) in the ordered resources. Cheap offers are often
# one instance type listed in many regions at one price; without a cap the max_options slots go
# to regions of a single offer and the fallback never reaches another cloud or GPU. Two regions
# give a same-offer fallback; EAGER_NEXT_REGION recovery moves between regions beyond that.
REGIONS_PER_OFFER = 2
SOURCE_ROOT = Path(__file__).resolve().parents[1]


class SkyTaskError(UserError):
    """The plan cannot be turned into a SkyPilot task (one line for the user)."""


@dataclass(frozen=True)
class SkippedPlacement:
    placement: Placement
    reason: str


def task_name(job_id: str) -> str:
    """The job id as a SkyPilot task name, which names the job's clusters: a cluster name must
    start with a letter (sky/skylet/constants.py, CLUSTER_NAME_VALID_REGEX) and a task name may not
    hold three separators in a row (sky/task.py, _VALID_NAME_REGEX); a spec name may be '7b-lora'."""
    name = re.sub(r"[._-]{3,}", "-", job_id).strip("._-")
    return name if name[:1].isalpha() else f"job-{name}"


def stage_data(local: Path, state_dir: Path) -> Path:
    """A folder holding only the data file (hard-linked, copied across file systems), keyed by the
    file's path, size and modification time, so a dry run and its launch ship the same folder."""
    st = local.stat()
    key = hashlib.sha256(f"{local.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = Path(state_dir) / STAGED_DATA_DIR / key
    target = folder / local.name
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{local.name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(local, tmp)
        except OSError:
            shutil.copy2(local, tmp)
        os.replace(tmp, target)
    return folder


def node_data(request: LaunchRequest) -> tuple[dict, Optional[Path]]:
    """(the node spec as the node on the cloud reads it, the local data file to ship). Only
    data.path changes, to where the file lands; the rest is the request's node spec as given."""
    node = copy.deepcopy(request.node_spec)
    local = (node.get("data") or {}).get("path")
    if local is None:
        return node, None
    local = Path(local)
    node["data"]["path"] = f"{NODE_DATA_DIR}/{local.name}"
    return node, local


def job_recovery(spec) -> dict:
    """SkyPilot restarts a job on a new cluster for an exit code in recover_on_exit_codes, and for
    no other: 75 (preempted after a checkpoint) and 76 (a crash the run script still retries,
    counting against spec.sky.max_restarts_on_errors itself), so exit 2 (bad input) ends the job."""
    return {"strategy": spec.sky.recovery_strategy, "max_restarts_on_errors": 0,
            "recover_on_exit_codes": list(RECOVER_ON_EXIT_CODES)}


def sky_resources(spec, placements: Sequence[Placement]):
    """Ordered sky.Resources for the placements SkyPilot can launch, capped at spec.sky.max_options.

    The placements' order (cost) is kept, but at most REGIONS_PER_OFFER regions of one
    (cloud, instance type, spot) are taken, so the slots span several offers; the first
    placement SkyPilot can launch is always the first resource.
    Returns (resources, skipped, num_nodes): a placement on a provider SkyPilot does not know, one
    its catalog does not list, or one whose cloud lacks a feature the resources need (MULTI_NODE
    for several nodes) is skipped with the reason rather than failing the whole task. A task has one
    num_nodes, set by the first placement SkyPilot can launch (the plan's choice, when it can); a
    placement spanning another number of nodes is skipped too. Placements left out by the
    per-offer cap are not "skipped": they are not failures.
    """
    from sky import exceptions

    resources, skipped = [], []
    num_nodes = None
    regions_taken: dict[tuple, int] = {}
    for p in placements:
        if len(resources) >= spec.sky.max_options:
            break
        offer_key = (p.provider, p.instance_type, p.gpu, p.gpu_count, p.spot, p.num_nodes)
        if regions_taken.get(offer_key, 0) >= REGIONS_PER_OFFER:
            continue
        if cloud_named(p.provider) is None:
            skipped.append(SkippedPlacement(p, f"SkyPilot has no cloud named '{p.provider}'"))
            continue
        if num_nodes is not None and p.num_nodes != num_nodes:
            skipped.append(SkippedPlacement(p, f"spans {p.num_nodes} node{'s' if p.num_nodes > 1 else ''}; "
                                               f"this task runs on {num_nodes}"))
            continue
        try:
            r = resources_for(p, job_recovery(spec))
        except (ValueError, exceptions.ResourcesUnavailableError) as e:  # not in sky's catalog
            skipped.append(SkippedPlacement(p, first_line(e)))
            continue
        problem = launch_problem(r, num_nodes=p.num_nodes)
        if problem:
            skipped.append(SkippedPlacement(p, problem))
            continue
        resources.append(r)
        num_nodes = p.num_nodes
        regions_taken[offer_key] = regions_taken.get(offer_key, 0) + 1
    return resources, skipped, num_nodes or 1


def choose_store(spec, job_id: str, resources, clouds: EnabledClouds) -> JobStore:
    """Mounted when every cloud in the task can mount the bucket and SkyPilot can reach the
    store's cloud for storage; otherwise the recipe writes to the store directly."""
    scheme = scheme_of(base_url(spec, job_id))
    mounted = STORE_CLOUD[scheme] in clouds.storage and all(can_mount_buckets(r) for r in resources)
    return JobStore.of(spec, job_id, mounted)


def store_mount(spec, store: JobStore):
    """The sky.Storage mounted at /ckpt: the user's bucket as it is, or the job's own bucket, which
    SkyPilot creates in the store's cloud and keeps after the job (persistent: the output is in it)."""
    import sky

    if spec.checkpoint.url:
        return sky.Storage(source=store.bucket_url, mode=sky.StorageMode.MOUNT_CACHED)
    store_type = sky.StoreType.S3 if store.scheme == "s3" else sky.StoreType.GCS
    return sky.Storage(name=store.bucket, stores=[store_type], mode=sky.StorageMode.MOUNT_CACHED, persistent=True)


@contextmanager
def catalog_fetch_is_one_line():
    """SkyPilot downloads a cloud's catalog the first time it needs it; offline that is a
    requests ConnectionError (an OSError) from deep inside sky: say it in one line. Called in-process,
    sky believes it runs on its API server and prints its spinner as raw `<sky-payload>` markup, and
    logs its own copy of the error: both are silenced here, where our one line says it all."""
    import logging

    from sky import sky_logging

    sky_logger = logging.getLogger("sky")
    level = sky_logger.level
    try:
        with sky_logging.silent():  # no spinner payloads, no info or warnings
            sky_logger.setLevel(logging.CRITICAL)  # silent() keeps errors; ours is the one line
            yield
    except OSError as e:
        raise SkyTaskError("SkyPilot could not fetch its price catalog (offline? its catalogs live in "
                           f"${{SKY_RUNTIME_DIR:-$HOME}}/.sky/catalogs): {first_line(e)}") from None
    finally:
        sky_logger.setLevel(level)


def _source_root() -> Path:
    if not (SOURCE_ROOT / "pyproject.toml").is_file() or not (SOURCE_ROOT / "recipes").is_dir():
        raise SkyTaskError(f"SkyPilot launches sync a spotune source checkout to the node; none at {SOURCE_ROOT}")
    return SOURCE_ROOT


def build_task(request: LaunchRequest, *, secrets: Optional[Mapping[str, str]] = None,
               clouds: Optional[EnabledClouds] = None):
    """(sky.Task, skipped placements) for a launch request. `secrets` are values (from the user's
    environment at launch time); leave them out to build the task for display. `clouds`: what
    `sky check` enabled (read from SkyPilot's state when not given)."""
    with catalog_fetch_is_one_line():
        return _build_task(request, secrets, clouds)


def _enabled_or_none() -> EnabledClouds:
    try:
        return enabled_clouds()
    except Exception:  # SkyPilot's state unreadable: no store can be mounted, the recipe writes it
        return EnabledClouds(frozenset(), frozenset())


def _build_task(request: LaunchRequest, secrets, clouds):
    import sky

    spec = request.spec
    resources, skipped, num_nodes = sky_resources(spec, request.placements)
    if not resources:
        why = f": {skipped[0].placement.provider}/{skipped[0].placement.region}: {skipped[0].reason}" if skipped else ""
        raise SkyTaskError(f"no option in the plan can be launched through SkyPilot{why}")
    store = choose_store(spec, request.job_id, resources, _enabled_or_none() if clouds is None else clouds)
    if secrets is not None and not store.mounted:
        problem = direct_write_problem(spec, secrets)
        if problem:
            raise SkyTaskError(f"checkpoints go to {store.url}, which not every cloud of this task can mount: {problem}")
    node_spec, data_file = node_data(request)
    envs = {str(k): str(v) for k, v in request.env.items()}
    envs.update({"SPOTUNE_JOB_ID": request.job_id, "SPOTUNE_STORE": store.url, "SPOTUNE_OUTPUT_URL": store.output_url,
                 "SPOTUNE_MAX_RESTARTS_ON_ERRORS": str(spec.sky.max_restarts_on_errors),
                 "SPOTUNE_SPEC_YAML": yaml.safe_dump(node_spec, sort_keys=False)})
    file_mounts = {}
    if data_file is not None:
        if not data_file.is_file():
            raise SkyTaskError(f"data file not found: {data_file}")
        file_mounts[NODE_DATA_DIR] = str(stage_data(data_file, Path(request.run_dir).parent.parent))
    # num_nodes instances of one resource each, SkyPilot's gang: setup and run go to every node.
    task = sky.Task(name=task_name(request.job_id), setup=setup_commands(), run=run_commands(store), envs=envs,
                    workdir=str(_source_root()), file_mounts=file_mounts or None, num_nodes=num_nodes)
    task.set_resources(resources)  # a list: SkyPilot tries them in this order
    if store.mounted:
        task.set_storage_mounts({MOUNT_POINT: store_mount(spec, store)})
    if secrets:
        task.update_secrets(dict(secrets))
    return task, skipped


def secrets_from_environment(spec, environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The secrets spec.sky.secrets names that are set here; read at launch, never stored."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in spec.sky.secrets if environ.get(name)}


def render_task_yaml(request: LaunchRequest, *, clouds: Optional[EnabledClouds] = None) -> str:
    """The task YAML `spotune launch --backend skypilot --dry-run` prints: the task submit would
    launch for this request. Secrets appear by name with no value: `sky jobs launch FILE --secret
    HF_TOKEN` would fill them from the environment."""
    task, skipped = build_task(request, clouds=clouds)
    with catalog_fetch_is_one_line():
        config = task.to_yaml_config()
    if request.spec.sky.secrets:
        config["secrets"] = {name: None for name in request.spec.sky.secrets}
    store = task.envs["SPOTUNE_STORE"]
    header = [f"# spotune job {request.job_id}: SkyPilot managed-job task (dry run, nothing launched)",
              "# resources are tried in order: the chosen option, then the plan's others by expected cost,",
              f"# at most {REGIONS_PER_OFFER} regions per instance type (recovery moves on between regions)",
              f"# checkpoints and output: {store} ({'mounted at ' + MOUNT_POINT if task.storage_mounts else 'written by the recipe'})"]
    if task.num_nodes > 1:
        header.append(f"# {task.num_nodes} nodes of each resource train together (torchrun across nodes, "
                      "the head node is rank 0)")
    for s in skipped:
        nodes = f" x {s.placement.num_nodes} nodes" if s.placement.num_nodes > 1 else ""
        header.append(f"# skipped {s.placement.provider}/{s.placement.region} {s.placement.gpu}:"
                      f"{s.placement.gpu_count}{nodes}{' spot' if s.placement.spot else ''}: {s.reason}")
    return "\n".join(header) + "\n" + yaml.dump(config, Dumper=_BlockDumper, sort_keys=False, width=1000)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (setup, run, the node spec) as readable `|` blocks."""


_BlockDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))
