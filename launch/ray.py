"""Ray Train on an existing Ray cluster (on-prem GPUs, a fleet): one Ray job per spotune job.

Where: the cluster's Jobs API address, from the constructor, $RAY_API_SERVER_ADDRESS or
$RAY_ADDRESS (an http://head:8265 address). What runs: the job's driver is
`python -m recipes.ray_train`, which runs the recipe under Ray Train's TorchTrainer: one worker per
GPU of the plan (gpu_count x num_nodes; CPU workers over gloo for a CPU placement), restarted from
the last checkpoint up to `ray.max_failures` times when a worker or node is lost. The runtime_env's
working_dir is a staging dir in the run dir (the request's node spec, with data.path pointing at the
staged copy of the data file, and that file) and its py_modules are this checkout's `recipes` and
`contract` packages, so the cluster runs exactly the recipe planned with here. The cluster's Python
needs spotune's `train` extra: the driver checks on every node that torch, transformers and peft
import, and fails with one line naming what is missing. Secrets are not passed (Ray keeps
runtime_env env_vars in its job table, visible on the dashboard): give the cluster HF_TOKEN in its
own environment.

The run dir is $SPOTUNE_RAY_RUN_ROOT/<job id> on the cluster (default ~/spotune-runs, which only a
one-node cluster shares): set SPOTUNE_RAY_RUN_ROOT, in the cluster's environment or the job's, to a
path every node mounts (NFS, a bucket mount). It is Ray Train's storage (RunConfig storage_path,
name = job id, so a resubmission resumes) and holds the recipe's checkpoints, which it reports to
Ray Train as they are written, so both agree on the latest one.

Price: Ray knows nothing of money. At submit the cluster's alive nodes (read through the same
dashboard address) are priced by launch/ray_pricing.py: catalog instance types, or the spec's
`ray.price_per_node_hour`; a node with no price is refused with one line, never run at $0. Each
worker-group start is an attempt: the recipe numbers its events by group start, so a lost worker
and Ray Train's restart appear as attempt 1 (failed, with Ray's reason) and attempt 2 (resumed from
the last checkpoint). Progress comes from `[spotune-event]` lines in the job log. A cancel stops
the Ray job: its driver passes the stop on to the workers, which save the last completed step.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import time
from collections import Counter
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

import yaml

from contract.backend import (TERMINAL_STATES, BackendError, DeviceReport, Feasibility, LaunchRequest, Observation,
                              ObservedAttempt, first_line)
from contract.budget import PRICE_ENV
from contract.events import (DIVERGED, ERROR, EVENTS_FILE, EXIT_PREEMPTED, FINISHED, OVER_BUDGET, PREEMPTED, START,
                             read_jsonl)
from contract.placement import Placement
from launch.event_log import flush_command, merge_events, mirror_command

STATE_FILE = "ray.json"
STAGE_DIR = "ray-job"
RECIPE = "python -m recipes.ray_train"
RUN_ROOT = "${SPOTUNE_RAY_RUN_ROOT:-$HOME/spotune-runs}"
STOP_WAIT_SECONDS = 300
JOB_STATE = {"PENDING": "pending", "RUNNING": "running", "SUCCEEDED": "succeeded",
             "FAILED": "failed", "STOPPED": "cancelled"}
END_REASON = {"SUCCEEDED": "finished", "FAILED": "failed", "STOPPED": "cancelled"}
# An attempt's own last word: what ended it, when a later group start or the job's end did not say.
ENDING_EVENTS = {FINISHED: "finished", PREEMPTED: "preempted", ERROR: "failed", OVER_BUDGET: "failed",
                 DIVERGED: "failed"}
WORKER_LOST = "worker_lost"  # recipes/ray_train.py: the controller's `error` for a group it lost
SOURCE_ROOT = Path(__file__).resolve().parents[1]


class RayBackend:
    name = "ray"
    pricing = "hourly"
    options = ()
    poll_seconds = 2.0  # one HTTP call to the cluster's dashboard
    max_nodes = None    # Ray Train spreads workers over the cluster's nodes; pricing refuses a job they cannot hold

    def __init__(self, state_dir: Path, *, address: Optional[str] = None, client=None,
                 recipe_command: str = RECIPE, events_refresh_seconds: float = 30.0, nodes=None):
        self._runs_dir = Path(state_dir) / "runs"
        self._address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
        self._client = client
        self._recipe_command = recipe_command  # tests give a trivial stand-in that speaks the contract
        self._events_refresh_seconds = events_refresh_seconds
        self._nodes = nodes  # () -> the cluster's nodes as ray.nodes() gives them; default: the dashboard's

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
        """The cluster's training hardware, from its alive nodes: the GPU type most GPU nodes have,
        the fewest GPUs any of them holds, and how many there are (one CPU worker per node on a
        cluster without GPUs). A cluster not reachable now reports nothing: the spec's local.gpu
        names the hardware and one node is planned; submit then prices what it finds."""
        if not self._address and self._nodes is None:
            return DeviceReport(None, 0, None)
        try:
            nodes = self.cluster_nodes()
        except BackendError:
            return DeviceReport(None, 0, None)
        with_gpus = [n for n in nodes if float((n.get("Resources") or {}).get("GPU", 0)) >= 1]
        if not with_gpus:
            return DeviceReport(None, 0, None, nodes=max(1, len(nodes)))
        kinds = Counter(_accelerator(n) for n in with_gpus)
        gpu, _ = kinds.most_common(1)[0]
        same = [n for n in with_gpus if _accelerator(n) == gpu]
        count = int(min(float(n["Resources"]["GPU"]) for n in same))
        return DeviceReport(gpu, count, None, nodes=len(same))

    def feasible(self, spec, placements) -> Feasibility:
        return Feasibility(tuple(placements))  # the hardware it has is the plan: nothing to rule out

    def describe(self, request: LaunchRequest) -> str:
        gpu, gpus_per_node, num_nodes = _hardware(request)
        workers = gpus_per_node * num_nodes
        return "\n".join([
            f"  cluster:     {self._address or '(none: set RAY_ADDRESS=http://<head>:8265)'}",
            f"  entrypoint:  {self._recipe_line(request, gpu, workers)}   (events mirrored into the job log)",
            f"  ray train:   {workers} worker{'s' if workers > 1 else ''} x {'1 GPU' if gpu != 'CPU' else '1 CPU'}, "
            f"up to {request.spec.ray.max_failures} restarts from the last checkpoint",
            f"  working dir: {request.run_dir / STAGE_DIR}   (the node spec and its data file)",
            f"  price:       the cluster's nodes, priced at submit (catalog or ray.price_per_node_hour)"])

    def submit(self, request: LaunchRequest) -> str:
        gpu, gpus_per_node, num_nodes = _hardware(request)
        workers = gpus_per_node * num_nodes
        client = self.client  # an unreachable cluster says so before anything else
        placement, priced = self._price(request, gpu, gpus_per_node, workers)  # before anything runs: never at $0
        stage = self._stage(request)
        submission_id = f"spotune-{request.job_id}"
        # Ray's job supervisor SIGKILLs 3 s after the stop SIGTERM unless told otherwise: give the
        # recipe time to write its checkpoint.
        env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_SECONDS),
                    **{str(k): str(v) for k, v in request.env.items()},
                    PRICE_ENV: str(placement.price_per_hour)}  # the node's budget guard prices what runs
        runtime_env = {"working_dir": str(stage), "env_vars": env_vars,
                       "py_modules": [str(SOURCE_ROOT / "recipes"), str(SOURCE_ROOT / "contract")]}
        # Written ahead of the submit: a launch killed in between leaves what find() needs.
        self._save(request.run_dir, {"submission_id": submission_id, "placement": placement.to_json(),
                                     "priced": priced, "events_fetched_at": None})
        # The driver only starts Ray Train; the workers ask for the GPUs.
        self._call("submit", client.submit_job, entrypoint=self._entrypoint(request, gpu, workers),
                   submission_id=submission_id, runtime_env=runtime_env,
                   metadata={"spotune_job_id": request.job_id})
        return submission_id

    def find(self, job_id: str, run_dir: Path) -> Optional[str]:
        """The Ray job of a launch that died between submitting and recording it: its submission id
        is spotune-<job id>, so the cluster either lists it or never got it."""
        submission_id = f"spotune-{job_id}"
        if not (Path(run_dir) / STATE_FILE).is_file():
            return None  # the state is written before the submit: nothing reached the cluster
        listed = self._call("job listing", self.client.list_jobs)
        return submission_id if any(job.submission_id == submission_id for job in listed) else None

    def poll(self, external_id: str) -> Observation:
        run_dir = self._run_dir(external_id)
        state = json.loads((run_dir / STATE_FILE).read_text())
        info = self._call("status", self.client.get_job_info, external_id)
        status = getattr(info.status, "value", str(info.status))
        job_state = JOB_STATE.get(status, "running")
        events_path = run_dir / EVENTS_FILE
        now = time.time()
        fetched_at = state.get("events_fetched_at")
        terminal = job_state in TERMINAL_STATES
        started = bool(info.start_time) and status != "PENDING"
        if started and (fetched_at is None or now - fetched_at >= self._events_refresh_seconds
                        or (terminal and not state.get("events_final"))):
            merge_events(self.logs(external_id), events_path)
            state.update(events_fetched_at=now, events_final=terminal)
            self._save(run_dir, state)
        attempts = ()
        if started:
            attempts = attempts_of(read_jsonl(events_path), Placement.from_json(state["placement"]), info, status,
                                   external_id)
        return Observation(state=job_state, attempts=attempts,
                           detail=_detail(info) if job_state == "failed" else None,
                           events_path=events_path if events_path.exists() else None)

    def cancel(self, external_id: str, *, graceful: bool = True) -> None:
        # stop_job sends SIGTERM to the driver's process group and SIGKILLs after Ray's stop
        # timeout; Ray then tears down the Ray Train workers. There is no harder stop to choose.
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
    def cluster_nodes(self) -> list[dict]:
        """The cluster's alive nodes, in ray.nodes()'s shape, from the dashboard's state API."""
        if self._nodes is not None:
            return list(self._nodes())
        if not self._address:
            raise BackendError("no Ray cluster address: set RAY_ADDRESS=http://<head>:8265")

        def listed():
            from ray.util.state import list_nodes

            return list_nodes(address=self._address, detail=True, raise_on_missing_output=False)

        return [{"NodeID": n.node_id, "Alive": n.state == "ALIVE", "NodeManagerAddress": n.node_ip,
                 "NodeName": n.node_name, "Resources": dict(n.resources_total or {}), "Labels": dict(n.labels or {})}
                for n in self._call("node listing", listed) if n.state == "ALIVE"]

    def _price(self, request: LaunchRequest, gpu: str, gpus_per_node: int, workers: int) -> tuple[Placement, list[str]]:
        """Where the attempts run as the ledger records them: the cluster's nodes the job uses, at
        what they cost, and how that was priced, for a person (launch/ray_pricing.py raises a one-line
        BackendError for a node with no price)."""
        from launch.ray_pricing import price_ray_cluster

        priced = price_ray_cluster(self.cluster_nodes(), request.spec.ray, world_size=workers, use_gpu=gpu != "CPU",
                                   catalog=request.instance_prices)
        return Placement(provider="ray", region=_host(self._address), gpu=gpu, gpu_count=gpus_per_node, spot=False,
                         price_per_hour=Decimal(priced.price_per_hour), num_nodes=priced.num_nodes), list(priced.lines)

    def _recipe_line(self, request: LaunchRequest, gpu: str, workers: int) -> str:
        args = [f"{self._recipe_command} spec.yaml --run-dir {RUN_ROOT}/{request.job_id}",
                f"--workers {workers}", f"--max-failures {request.spec.ray.max_failures}"]
        if gpu != "CPU":
            args.append("--gpus-per-worker 1")
        return " ".join(args)

    def _entrypoint(self, request: LaunchRequest, gpu: str, workers: int) -> str:
        recipe = self._recipe_line(request, gpu, workers).replace(f"{RUN_ROOT}/{request.job_id}", '"$RUN_DIR"')
        script = "\n".join([
            "set -e", f'RUN_DIR="{RUN_ROOT}/{request.job_id}"', 'mkdir -p "$RUN_DIR"', mirror_command("$RUN_DIR"),
            "set +e", recipe, "rc=$?", flush_command("$RUN_DIR"), "exit $rc"])
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


def attempts_of(events: list[dict], placement: Placement, info, status: str,
                external_id: str) -> tuple[ObservedAttempt, ...]:
    """One attempt per worker-group start (the recipe's attempt numbers), the first from the job's
    start. An attempt ends at its own last word (finished, preempted, an error: Ray Train's
    controller writes one for a lost group), else where the next one starts; the last one also
    ends with the job, as Ray reports it (exit 75: a preemption the recipe checkpointed)."""
    by_attempt: dict[int, list[dict]] = {}
    for event in events:
        if isinstance(event.get("attempt"), int) and isinstance(event.get("time"), (int, float)):
            by_attempt.setdefault(event["attempt"], []).append(event)
    numbers = sorted(n for n, said in by_attempt.items() if any(e["event"] == START for e in said) or n == 1)
    if not numbers or numbers[0] != 1:
        numbers = [1, *numbers]
    job_ended = END_REASON.get(status)
    attempts = []
    started_at = _utc_ms(info.start_time)
    for i, n in enumerate(numbers):
        said = by_attempt.get(n, [])
        # Ray Train's word on a lost worker before a surviving rank's view of it (a closed connection).
        last_word = next((e for e in said if e.get("kind") == WORKER_LOST), None) or next(
            (e for e in reversed(said) if e["event"] in ENDING_EVENTS), None)
        ended_at = end_reason = detail = None
        if last_word is not None:
            ended_at, end_reason = _utc_s(last_word["time"]), ENDING_EVENTS[last_word["event"]]
            detail = last_word.get("message") if last_word["event"] == ERROR else None
        if i + 1 < len(numbers):
            if ended_at is None:  # no word from it: it ended when Ray Train started the next group
                following = by_attempt.get(numbers[i + 1], [])
                ended_at = _utc_s(following[0]["time"]) if following else started_at
                end_reason, detail = "failed", "the worker group ended without a word; Ray Train restarted it"
        elif job_ended is not None:
            ended_at = _utc_ms(info.end_time) or ended_at
            end_reason = job_ended
            if status == "FAILED" and info.driver_exit_code == EXIT_PREEMPTED:
                end_reason = "preempted"  # the recipe checkpointed on SIGTERM and exited 75
            detail = detail or (_detail(info) if job_ended != "finished" else None)
        attempts.append(ObservedAttempt(n=n, placement=placement, started_at=started_at, ended_at=ended_at,
                                        end_reason=end_reason, external_id=external_id, detail=detail))
        started_at = ended_at or started_at
    return tuple(attempts)


def _hardware(request: LaunchRequest) -> tuple[str, int, int]:
    """The plan's hardware for this job: (GPU name or CPU, workers per node, nodes). The chosen
    placement says which; without one that names a GPU, spec.local.gpu (one) or one CPU worker."""
    chosen = request.placements[0] if request.placements else None
    if chosen is not None:
        return chosen.gpu, max(chosen.gpu_count, 1), max(chosen.num_nodes, 1)
    return (request.spec.local.gpu or "CPU"), 1, 1


def _accelerator(node: dict) -> Optional[str]:
    """The GPU a Ray node reports: its accelerator-type label, else an accelerator_type:X resource."""
    label = (node.get("Labels") or {}).get("ray.io/accelerator-type")
    if label:
        return str(label)
    return next((key.split(":", 1)[1] for key in (node.get("Resources") or {}) if key.startswith("accelerator_type:")),
                None)


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


def _utc_s(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)
