"""Ray Jobs on an existing Ray cluster (on-prem GPUs, a fleet): one Ray job per spotune job.

Where: the cluster's Jobs API address, from the constructor, $RAY_API_SERVER_ADDRESS or
$RAY_ADDRESS (an http://head:8265 address). What runs: a runtime_env whose working_dir is a
staging dir in the run dir (the request's node spec, with data.path pointing at the staged copy
of the data file, and that file) and whose py_modules are this checkout's `recipes` and
`contract` packages, so the cluster runs exactly the recipe planned with here; the cluster's
Python needs spotune's `train` extra installed. Secrets are not passed (Ray keeps runtime_env
env_vars in its job table, visible on the dashboard): give the cluster HF_TOKEN in its own
environment. The recipe's run dir is on the node that runs the driver, under
$SPOTUNE_RAY_RUN_ROOT (default ~/spotune-runs), keyed by job id so a resubmission resumes.

Price: Ray knows nothing of money, and a cluster is hardware you already have, so an attempt is
priced at the hourly rate the plan used: the spec's `local.price_per_hour` ("what an hour of this
cluster costs you") unless `--price-per-hour` replaced it. Ray does not recover jobs, so a job has
one attempt; progress comes from `[spotune-event]` lines in the job log.
"""
from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

import yaml

from contract.backend import (TERMINAL_STATES, BackendError, DeviceReport, Feasibility, LaunchRequest, Observation,
                              ObservedAttempt, first_line)
from contract.events import EVENTS_FILE, EXIT_PREEMPTED
from contract.placement import Placement
from launch.event_log import flush_command, merge_events, mirror_command

STATE_FILE = "ray.json"
STAGE_DIR = "ray-job"
RECIPE = "python -m recipes.sft"
STOP_WAIT_SECONDS = 300
JOB_STATE = {"PENDING": "pending", "RUNNING": "running", "SUCCEEDED": "succeeded",
             "FAILED": "failed", "STOPPED": "cancelled"}
END_REASON = {"SUCCEEDED": "finished", "FAILED": "failed", "STOPPED": "cancelled"}
SOURCE_ROOT = Path(__file__).resolve().parents[1]


class RayBackend:
    name = "ray"
    pricing = "hourly"
    options = ()
    poll_seconds = 2.0  # one HTTP call to the cluster's dashboard

    def __init__(self, state_dir: Path, *, address: Optional[str] = None, client=None,
                 recipe_command: str = RECIPE, events_refresh_seconds: float = 30.0):
        self._runs_dir = Path(state_dir) / "runs"
        self._address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
        self._client = client
        self._recipe_command = recipe_command  # tests give a trivial stand-in that speaks the contract
        self._events_refresh_seconds = events_refresh_seconds

    @property
    def client(self):
        if self._client is None:
            if not self._address:
                raise BackendError("no Ray cluster address: set RAY_ADDRESS=http://<head>:8265")
            try:
                from ray.job_submission import JobSubmissionClient
                self._client = JobSubmissionClient(self._address)
            except Exception as e:
                raise BackendError(f"cannot reach the Ray cluster at {self._address}: {first_line(e)}") from None
        return self._client

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"Ray {what} failed: {first_line(e)}") from None

    # -- protocol ----------------------------------------------------------------------------
    def device(self) -> DeviceReport:
        # Which GPUs a job gets is the cluster's business: the orchestrator names them from
        # the spec's local.gpu.
        return DeviceReport(None, 0, None)

    def feasible(self, spec, placements) -> Feasibility:
        return Feasibility(tuple(placements))  # the hardware it has is the plan: nothing to rule out

    def describe(self, request: LaunchRequest) -> str:
        placement = self._placement(request)
        return "\n".join([
            f"  cluster:     {self._address or '(none: set RAY_ADDRESS=http://<head>:8265)'}",
            f"  entrypoint:  {self._recipe_line(_num_gpus(placement))} spec.yaml --run-dir "
            f"${{SPOTUNE_RAY_RUN_ROOT:-$HOME/spotune-runs}}/{request.job_id}   (events mirrored into the job log)",
            f"  working dir: {request.run_dir / STAGE_DIR}   (the node spec and its data file)",
            f"  placement:   {placement.label()}"])

    def submit(self, request: LaunchRequest) -> str:
        placement = self._placement(request)
        gpu_count = _num_gpus(placement)
        stage = self._stage(request)
        submission_id = f"spotune-{request.job_id}"
        entrypoint = self._entrypoint(request.job_id, gpu_count)
        # Ray's job supervisor SIGKILLs 3 s after the stop SIGTERM unless told otherwise: give the
        # recipe time to write its checkpoint.
        env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_SECONDS),
                    **{str(k): str(v) for k, v in request.env.items()}}
        runtime_env = {"working_dir": str(stage), "env_vars": env_vars,
                       "py_modules": [str(SOURCE_ROOT / "recipes"), str(SOURCE_ROOT / "contract")]}
        self._call("submit", self.client.submit_job, entrypoint=entrypoint, submission_id=submission_id,
                   runtime_env=runtime_env, entrypoint_num_gpus=gpu_count or None,
                   metadata={"spotune_job_id": request.job_id})
        self._save(request.run_dir, {"submission_id": submission_id, "placement": placement.to_json(),
                                     "events_fetched_at": None})
        return submission_id

    def poll(self, external_id: str) -> Observation:
        run_dir = self._run_dir(external_id)
        state = json.loads((run_dir / STATE_FILE).read_text())
        info = self._call("status", self.client.get_job_info, external_id)
        status = getattr(info.status, "value", str(info.status))
        job_state = JOB_STATE.get(status, "running")
        attempts = ()
        if info.start_time and status != "PENDING":
            end_reason = END_REASON.get(status)
            if status == "FAILED" and info.driver_exit_code == EXIT_PREEMPTED:
                end_reason = "preempted"  # the recipe checkpointed on SIGTERM and exited 75
            attempts = (ObservedAttempt(
                n=1, placement=Placement.from_json(state["placement"]), started_at=_utc_ms(info.start_time),
                ended_at=_utc_ms(info.end_time) if end_reason else None, end_reason=end_reason,
                external_id=external_id, detail=_detail(info) if end_reason else None),)
        events_path = run_dir / EVENTS_FILE
        now = time.time()
        fetched_at = state.get("events_fetched_at")
        terminal = job_state in TERMINAL_STATES
        if attempts and (fetched_at is None or now - fetched_at >= self._events_refresh_seconds
                         or (terminal and not state.get("events_final"))):
            merge_events(self.logs(external_id), events_path)
            state.update(events_fetched_at=now, events_final=terminal)
            self._save(run_dir, state)
        return Observation(state=job_state, attempts=attempts,
                           detail=_detail(info) if job_state == "failed" else None,
                           events_path=events_path if events_path.exists() else None)

    def cancel(self, external_id: str, *, graceful: bool = True) -> None:
        # stop_job sends SIGTERM to the entrypoint's process group (the recipe checkpoints and
        # exits 75) and SIGKILLs after Ray's stop timeout; there is no harder stop to choose.
        self._call("stop", self.client.stop_job, external_id)

    def logs(self, external_id: str, *, follow: bool = False) -> Iterator[str]:
        if not follow:
            yield from self._call("logs", self.client.get_job_logs, external_id).splitlines()
            return
        import asyncio

        loop = asyncio.new_event_loop()  # tail_job_logs is an async generator over a websocket
        try:
            stream = self.client.tail_job_logs(external_id).__aiter__()
            pending = ""
            while True:
                try:
                    chunk = loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    break
                pending += chunk
                *complete, pending = pending.split("\n")
                yield from complete
            if pending:
                yield pending
        except Exception as e:
            raise BackendError(f"Ray logs failed: {first_line(e)}") from None
        finally:
            loop.close()

    # -- helpers -----------------------------------------------------------------------------
    def _placement(self, request: LaunchRequest) -> Placement:
        """Where the attempt runs as the ledger records it: this cluster, at the hourly rate planned."""
        gpu, gpu_count, price = _hardware(request)
        return Placement(provider="ray", region=_host(self._address), gpu=gpu, gpu_count=gpu_count,
                         spot=False, price_per_hour=price)

    def _recipe_line(self, gpu_count: int) -> str:
        if gpu_count > 1 and self._recipe_command == RECIPE:
            return f"torchrun --standalone --nproc_per_node={gpu_count} -m recipes.sft"
        return self._recipe_command

    def _entrypoint(self, job_id: str, gpu_count: int) -> str:
        run_dir = f"${{SPOTUNE_RAY_RUN_ROOT:-$HOME/spotune-runs}}/{job_id}"
        recipe = self._recipe_line(gpu_count)
        script = "\n".join([
            "set -e", f'RUN_DIR="{run_dir}"', 'mkdir -p "$RUN_DIR"', mirror_command("$RUN_DIR"),
            "set +e",
            f'{recipe} spec.yaml --run-dir "$RUN_DIR" --checkpoint-dir "$RUN_DIR/checkpoints"',
            "rc=$?", flush_command("$RUN_DIR"), "exit $rc"])
        return "bash -c " + shlex.quote(script)

    @staticmethod
    def _stage(request: LaunchRequest) -> Path:
        """run_dir/ray-job: the working_dir Ray uploads. The request's node spec, with data.path
        relative to the working dir the driver starts in, and the data file it points at."""
        stage = request.run_dir / STAGE_DIR
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        node = copy.deepcopy(request.node_spec)
        data_path = (node.get("data") or {}).get("path")
        if data_path is not None:
            data_path = Path(data_path)
            if not data_path.is_file():
                raise BackendError(f"data file not found: {data_path}")
            (stage / "data").mkdir()
            shutil.copy2(data_path, stage / "data" / data_path.name)
            node["data"]["path"] = f"data/{data_path.name}"
        (stage / "spec.yaml").write_text(yaml.safe_dump(node, sort_keys=False))
        return stage

    def _run_dir(self, external_id: str) -> Path:
        run_dir = self._runs_dir / external_id.removeprefix("spotune-")
        if not (run_dir / STATE_FILE).is_file():
            raise BackendError(f"no run directory under {self._runs_dir} knows Ray job {external_id}")
        return run_dir

    @staticmethod
    def _save(run_dir: Path, state: dict) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, run_dir / STATE_FILE)


def _hardware(request: LaunchRequest) -> tuple[str, int, Decimal]:
    """The cluster's GPUs for this job and what an hour of them costs. A `local` placement (the
    orchestrator's hourly plan) says which, how many and at what price (spec.local.price_per_hour,
    or the --price-per-hour that replaced it); cloud placements say nothing about this cluster,
    so spec.local.gpu (one) or CPU, at spec.local.price_per_hour."""
    local = next((p for p in request.placements if p.provider == "local"), None)
    if local is not None:
        return local.gpu, local.gpu_count, local.price_per_hour
    spec = request.spec
    gpu, count = (spec.local.gpu, 1) if spec.local.gpu else ("CPU", 0)
    return gpu, count, Decimal(str(spec.local.price_per_hour))


def _num_gpus(placement: Placement) -> int:
    """The GPUs to ask Ray for: none for a CPU placement, which the plan counts as one CPU."""
    return 0 if placement.gpu == "CPU" else placement.gpu_count


def _host(address: Optional[str]) -> str:
    return urlparse(address).hostname or address if address else "unknown"


def _detail(info) -> Optional[str]:
    message = info.message or ""
    if info.driver_exit_code not in (None, 0):
        message = f"exit code {info.driver_exit_code}: {message}" if message else f"exit code {info.driver_exit_code}"
    return _first_line_text(message) or None


def _first_line_text(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _utc_ms(ms: Optional[int]) -> Optional[datetime]:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
