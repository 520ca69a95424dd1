"""The SkyPilot task for a job: ranked placements -> ordered resources, checkpoint bucket, setup, run.

One builder serves both `spotune launch --backend skypilot --dry-run` (render_task_yaml) and the
real submit (SkyPilotBackend), so the YAML a user reads is the task that would be launched, less
secret values. `sky` is imported inside functions only: it takes seconds to import.

What runs on the node:
- workdir: this spotune checkout (synced by SkyPilot, honouring .gitignore), installed with the
  `train` extra in setup, so the recipe on the node is exactly the code planned with here;
- the request's node spec, with only data.path changed to the mounted data file, travels in
  the env var SPOTUNE_SPEC_YAML (no secrets in it) and is written to a file by `run`;
- the checkpoint bucket is mounted MOUNT_CACHED at /ckpt; the recipe's run dir is
  /ckpt/$SKYPILOT_TASK_ID (stable across recoveries, new per managed job), holding
  events.jsonl, checkpoints/ and output/;
- events.jsonl is also mirrored into the job's log with the prefix `[spotune-event] `, which is
  how the backend reads progress (see launch/skypilot.py).
"""
from __future__ import annotations

import copy
import os
import re
import shlex
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Mapping, Optional, Sequence

import yaml

from contract.backend import LaunchRequest, first_line
from contract.errors import UserError
from contract.events import EVENTS_FILE, EXIT_PREEMPTED
from contract.placement import Placement
from launch.event_log import flush_command, mirror_command

CHECKPOINT_MOUNT = "/ckpt"
NODE_DATA_DIR = "/spotune-data"
NODE_SPEC_FILE = "$HOME/spotune-spec.yaml"
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


def bucket_name(spec, job_id: str) -> str:
    """spec.sky.bucket, else one bucket per job: valid as an S3/GCS name (3-63 of [a-z0-9-])."""
    if spec.sky.bucket:
        return spec.sky.bucket
    slug = re.sub(r"[^a-z0-9-]+", "-", job_id.lower()).strip("-")
    return f"spotune-ckpt-{slug}"[:63].rstrip("-")


def node_data(request: LaunchRequest) -> tuple[dict, Optional[Path]]:
    """(the node spec as the node on the cloud reads it, the local data file to ship). Only
    data.path changes, to where the file is mounted; the rest is the request's node spec as given."""
    node = copy.deepcopy(request.node_spec)
    local = (node.get("data") or {}).get("path")
    if local is None:
        return node, None
    local = Path(local)
    node["data"]["path"] = f"{NODE_DATA_DIR}/{local.name}"
    return node, local


def _torch_pin() -> str:
    """torch as tested here, without the local build tag: PyPI's Linux wheel of that version is the
    CUDA build. Unpinned (the train extra's range) when this machine has no torch."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return ""
    return f"torch=={version.split('+')[0]}"


def setup_commands() -> str:
    torch_pin = _torch_pin()
    lines = ["set -e", "python -m pip install -q --upgrade pip"]
    if torch_pin:
        lines.append(f"python -m pip install -q {shlex.quote(torch_pin)}")
    lines.append("python -m pip install -q -e '.[train]'")
    return "\n".join(lines) + "\n"


def run_commands() -> str:
    run_dir = f"{CHECKPOINT_MOUNT}/$SKYPILOT_TASK_ID"
    recipe = f'-m recipes.sft "{NODE_SPEC_FILE}" --run-dir "$RUN_DIR" --checkpoint-dir "$RUN_DIR/checkpoints"'
    return "\n".join([
        "set -e",
        f'RUN_DIR="{run_dir}"',
        'mkdir -p "$RUN_DIR"',
        f'printf "%s\\n" "$SPOTUNE_SPEC_YAML" > "{NODE_SPEC_FILE}"',
        # Progress reaches the backend through the job log: every event line, prefixed.
        mirror_command("$RUN_DIR"),
        "set +e",
        # One process per GPU: torchrun where the node has several (DDP for LoRA/QLoRA, FSDP for full).
        'if [ "${SKYPILOT_NUM_GPUS_PER_NODE:-1}" -gt 1 ]; then',
        f'  python -m torch.distributed.run --standalone --nproc-per-node "$SKYPILOT_NUM_GPUS_PER_NODE" {recipe}',
        "else",
        f"  python {recipe}",
        "fi",
        "rc=$?",
        # torchrun turns the recipe's 75 (preempted after a checkpoint) into 1; the event log knows better.
        f'if [ $rc -ne 0 ] && python -m contract.events ended-preempted "$RUN_DIR/{EVENTS_FILE}"; then rc={EXIT_PREEMPTED}; fi',
        flush_command("$RUN_DIR"),
        "exit $rc",
    ]) + "\n"


def _job_recovery(spec) -> dict:
    # The recipe exits 75 after a clean checkpoint on SIGTERM (a spot termination notice):
    # recover then, whatever max_restarts_on_errors says.
    return {"strategy": spec.sky.recovery_strategy,
            "max_restarts_on_errors": spec.sky.max_restarts_on_errors,
            "recover_on_exit_codes": [EXIT_PREEMPTED]}


def sky_resources(spec, placements: Sequence[Placement]):
    """Ordered sky.Resources for the placements SkyPilot can launch, capped at spec.sky.max_options.

    The placements' order (cost) is kept, but at most REGIONS_PER_OFFER regions of one
    (cloud, instance type, spot) are taken, so the slots span several offers; the first
    placement SkyPilot can launch is always the first resource.
    Returns (resources, skipped): a placement on a provider SkyPilot does not know, or one its
    catalog does not list, is skipped with the reason rather than failing the whole task.
    Placements left out by the per-offer cap are not "skipped": they are not failures.
    """
    import sky
    from sky import exceptions
    from sky.utils import registry

    resources, skipped = [], []
    regions_taken: dict[tuple, int] = {}
    for p in placements:
        if len(resources) >= spec.sky.max_options:
            break
        offer_key = (p.provider, p.instance_type, p.gpu, p.gpu_count, p.spot)
        if regions_taken.get(offer_key, 0) >= REGIONS_PER_OFFER:
            continue
        try:
            cloud = registry.CLOUD_REGISTRY.from_str(p.provider)
        except ValueError:
            cloud = None
        if cloud is None:
            skipped.append(SkippedPlacement(p, f"SkyPilot has no cloud named '{p.provider}'"))
            continue
        try:
            resources.append(sky.Resources(
                infra=f"{p.provider}/{p.region}", instance_type=p.instance_type,
                accelerators={p.gpu: p.gpu_count}, use_spot=p.spot, job_recovery=_job_recovery(spec)))
            regions_taken[offer_key] = regions_taken.get(offer_key, 0) + 1
        except (ValueError, exceptions.ResourcesUnavailableError) as e:  # not in sky's catalog
            skipped.append(SkippedPlacement(p, first_line(e)))
    return resources, skipped


@contextmanager
def _catalog_fetch_is_one_line():
    """SkyPilot downloads a cloud's catalog the first time it needs it; offline that is a
    requests ConnectionError (an OSError) from deep inside sky: say it in one line."""
    try:
        yield
    except OSError as e:
        raise SkyTaskError("SkyPilot could not fetch its price catalog (offline? its catalogs live in "
                           f"${{SKY_RUNTIME_DIR:-$HOME}}/.sky/catalogs): {first_line(e)}") from None


def _source_root() -> Path:
    if not (SOURCE_ROOT / "pyproject.toml").is_file() or not (SOURCE_ROOT / "recipes").is_dir():
        raise SkyTaskError(f"SkyPilot launches sync a spotune source checkout to the node; none at {SOURCE_ROOT}")
    return SOURCE_ROOT


def build_task(request: LaunchRequest, *, secrets: Optional[Mapping[str, str]] = None):
    """(sky.Task, skipped placements) for a launch request. `secrets` are values (from the user's
    environment at launch time); leave them out to build the task for display."""
    with _catalog_fetch_is_one_line():
        return _build_task(request, secrets)


def _build_task(request: LaunchRequest, secrets):
    import sky

    spec = request.spec
    resources, skipped = sky_resources(spec, request.placements)
    if not resources:
        why = f": {skipped[0].placement.provider}/{skipped[0].placement.region}: {skipped[0].reason}" if skipped else ""
        raise SkyTaskError(f"no option in the plan can be launched through SkyPilot{why}")
    node_spec, data_file = node_data(request)
    envs = {str(k): str(v) for k, v in request.env.items()}
    envs.update({"SPOTUNE_JOB_ID": request.job_id,
                 "SPOTUNE_SPEC_YAML": yaml.safe_dump(node_spec, sort_keys=False)})
    file_mounts = {}
    if data_file is not None:
        if not data_file.is_file():
            raise SkyTaskError(f"data file not found: {data_file}")
        file_mounts[node_spec["data"]["path"]] = str(data_file)
    task = sky.Task(name=request.job_id, setup=setup_commands(), run=run_commands(), envs=envs,
                    workdir=str(_source_root()), file_mounts=file_mounts or None)
    task.set_resources(resources)  # a list: SkyPilot tries them in this order
    bucket = bucket_name(spec, request.job_id)
    storage = (sky.Storage(source=bucket, mode=sky.StorageMode.MOUNT_CACHED) if "://" in bucket
               else sky.Storage(name=bucket, mode=sky.StorageMode.MOUNT_CACHED))
    task.set_storage_mounts({CHECKPOINT_MOUNT: storage})
    if secrets:
        task.update_secrets(dict(secrets))
    return task, skipped


def secrets_from_environment(spec, environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The secrets spec.sky.secrets names that are set here; read at launch, never stored."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in spec.sky.secrets if environ.get(name)}


def render_task_yaml(request: LaunchRequest) -> str:
    """The task YAML `spotune launch --backend skypilot --dry-run` prints: the task submit would
    launch for this request. Secrets appear by name with no value: `sky jobs launch FILE --secret
    HF_TOKEN` would fill them from the environment."""
    task, skipped = build_task(request)
    with _catalog_fetch_is_one_line():
        config = task.to_yaml_config()
    if request.spec.sky.secrets:
        config["secrets"] = {name: None for name in request.spec.sky.secrets}
    header = [f"# spotune job {request.job_id}: SkyPilot managed-job task (dry run, nothing launched)",
              "# resources are tried in order: the chosen option, then the plan's others by expected cost,",
              f"# at most {REGIONS_PER_OFFER} regions per instance type (recovery moves on between regions)"]
    for s in skipped:
        header.append(f"# skipped {s.placement.provider}/{s.placement.region} {s.placement.gpu}:"
                      f"{s.placement.gpu_count}{' spot' if s.placement.spot else ''}: {s.reason}")
    return "\n".join(header) + "\n" + yaml.dump(config, Dumper=_BlockDumper, sort_keys=False, width=1000)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (setup, run, the node spec) as readable `|` blocks."""


_BlockDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))
