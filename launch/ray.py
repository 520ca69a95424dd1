"""Ray Jobs on an existing Ray cluster (on-prem GPUs, a fleet): one Ray job per spotune job.

Where: the cluster's Jobs API address, from the constructor, $RAY_API_SERVER_ADDRESS or
$RAY_ADDRESS (an http://head:8265 address). What runs: a runtime_env whose working_dir is a
staging dir in the run dir (the spec as the node reads it, plus the data file) and whose
py_modules is this checkout's `recipes` package, so the cluster runs exactly the recipe planned
with here; the cluster's Python needs spotune's `train` extra installed. Secrets are not passed
(Ray keeps runtime_env env_vars in its job table, visible on the dashboard): give the cluster
HF_TOKEN in its own environment. The recipe's run dir is on the node that runs the driver, under
$SPOTUNE_RAY_RUN_ROOT (default ~/spotune-runs), keyed by job id so a resubmission resumes.

Price: Ray knows nothing of money, so an attempt is priced at the spec's `local.price_per_hour`
(reused as "what an hour of this cluster costs you" for on-prem clusters). Ray does not recover
jobs, so a job has one attempt; progress comes from `[spotune-event]` lines in the job log.
"""
from __future__ import annotations

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

from launch.base import BackendError, LaunchRequest, Observation, ObservedAttempt, Placement, first_line
from launch.event_log import flush_command, merge_events, mirror_command

STATE_FILE = "ray.json"
RECIPE = "python -m recipes.sft"
PREEMPTED_EXIT_CODE = 75
STOP_WAIT_SECONDS = 300
JOB_STATE = {"PENDING": "pending", "RUNNING": "running", "SUCCEEDED": "succeeded",
             "FAILED": "failed", "STOPPED": "cancelled"}
END_REASON = {"SUCCEEDED": "finished", "FAILED": "failed", "STOPPED": "cancelled"}
SOURCE_ROOT = Path(__file__).resolve().parents[1]


class RayBackend:
    name = "ray"

    def __init__(self, runs_dir: Optional[Path] = None, *, address: Optional[str] = None,
                 client=None, recipe_command: str = RECIPE, events_refresh_seconds: float = 30.0):
        if runs_dir is None:
            from orchestrator.settings import state_dir
            runs_dir = state_dir() / "runs"
        self._runs_dir = Path(runs_dir)
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
    def submit(self, request: LaunchRequest) -> str:
        from orchestrator.spec import load_spec

        spec = load_spec(request.spec_path)
        gpu, gpu_count = _gpu(spec, request)
        stage = self._stage(spec, request.run_dir)
        submission_id = f"spotune-{request.job_id}"
        entrypoint = self._entrypoint(request.job_id, gpu_count)
        # Ray's job supervisor SIGKILLs 3 s after the stop SIGTERM unless told otherwise: give the
        # recipe time to write its checkpoint.
        env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_SECONDS),
                    **{str(k): str(v) for k, v in request.env.items()}}
        runtime_env = {"working_dir": str(stage), "py_modules": [str(SOURCE_ROOT / "recipes")],
                       "env_vars": env_vars}
        self._call("submit", self.client.submit_job, entrypoint=entrypoint, submission_id=submission_id,
                   runtime_env=runtime_env, entrypoint_num_gpus=gpu_count or None,
                   metadata={"spotune_job_id": request.job_id})
        placement = Placement(provider="ray", region=_host(self._address), gpu=gpu, gpu_count=gpu_count,
                              spot=False, price_per_hour=Decimal(str(spec.local.price_per_hour)))
        self._save(request.run_dir, {"submission_id": submission_id, "placement": _placement_json(placement),
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
            if status == "FAILED" and info.driver_exit_code == PREEMPTED_EXIT_CODE:
                end_reason = "preempted"  # the recipe checkpointed on SIGTERM and exited 75
            attempts = (ObservedAttempt(
                n=1, placement=_placement(state["placement"]), started_at=_utc_ms(info.start_time),
                ended_at=_utc_ms(info.end_time) if end_reason else None, end_reason=end_reason,
                external_id=external_id, detail=_detail(info) if end_reason else None),)
        events_path = run_dir / "events.jsonl"
        now = time.time()
        fetched_at = state.get("events_fetched_at")
        terminal = job_state in ("succeeded", "failed", "cancelled")
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
    def _entrypoint(self, job_id: str, gpu_count: int) -> str:
        run_dir = f"${{SPOTUNE_RAY_RUN_ROOT:-$HOME/spotune-runs}}/{job_id}"
        recipe = self._recipe_command
        if gpu_count > 1 and recipe == RECIPE:
            recipe = f"torchrun --standalone --nproc_per_node={gpu_count} -m recipes.sft"
        script = "\n".join([
            "set -e", f'RUN_DIR="{run_dir}"', 'mkdir -p "$RUN_DIR"', mirror_command("$RUN_DIR"),
            "set +e",
            f'{recipe} spec.yaml --run-dir "$RUN_DIR" --checkpoint-dir "$RUN_DIR/checkpoints"',
            "rc=$?", flush_command("$RUN_DIR"), "exit $rc"])
        return "bash -c " + shlex.quote(script)

    def _stage(self, spec, run_dir: Path) -> Path:
        """run_dir/ray-job: the working_dir Ray uploads (the node's spec and its data file)."""
        stage = run_dir / "ray-job"
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        raw = spec.to_dict()
        data_path = spec.data_path()
        if data_path is not None:
            if not data_path.is_file():
                raise BackendError(f"data file not found: {data_path}")
            (stage / "data").mkdir()
            shutil.copy2(data_path, stage / "data" / data_path.name)
            raw["data"]["path"] = f"data/{data_path.name}"
        (stage / "spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
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


def _gpu(spec, request: LaunchRequest) -> tuple[str, int]:
    """The cluster's GPUs for this job: a `local` placement (planner.plan_local) says which and
    how many; cloud placements say nothing about this cluster, so spec.local.gpu (one) or CPU."""
    local = next((p for p in request.placements if p.provider == "local"), None)
    if local is not None:
        return local.gpu, local.gpu_count
    return (spec.local.gpu, 1) if spec.local.gpu else ("CPU", 0)


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


def _placement_json(p: Placement) -> dict:
    return {"provider": p.provider, "region": p.region, "gpu": p.gpu, "gpu_count": p.gpu_count,
            "spot": p.spot, "price_per_hour": str(p.price_per_hour), "instance_type": p.instance_type}


def _placement(raw: dict) -> Placement:
    return Placement(**{**raw, "price_per_hour": Decimal(raw["price_per_hour"])})
