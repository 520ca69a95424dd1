"""RayBackend against a real Ray head started on loopback for this module (about 30-40 s to start
on a small machine). The recipe is replaced by a trivial stand-in that speaks the recipe contract
(reads the staged spec and data, writes events.jsonl, exits 0 / 1 / 75 on SIGTERM): training a
model through Ray on two shared CPU cores would take minutes and test the recipe, not the backend."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import pytest

from contract.backend import BackendError, DeviceReport, LaunchRequest, make_backend
from contract.placement import Placement
from contract.spec import load_spec
from launch.ray import RayBackend

pytestmark = pytest.mark.slow

STAND_IN = r'''
import json, os, signal, sys, time, yaml
spec_file, run_dir = sys.argv[1], sys.argv[sys.argv.index("--run-dir") + 1]
spec = yaml.safe_load(open(spec_file))
events = open(os.path.join(run_dir, "events.jsonl"), "a")
def emit(event, **fields):
    events.write(json.dumps({"event": event, "time": time.time(), "attempt": 1, **fields}) + "\n"); events.flush()
def on_term(signum, frame):
    emit("preempted", step=1, signal="SIGTERM"); sys.exit(75)
signal.signal(signal.SIGTERM, on_term)
lines = len(open(spec["data"]["path"]).read().splitlines())
emit("start", resumed_from_step=None, total_steps=lines)
behaviour = os.environ["STAND_IN_BEHAVIOUR"]
if behaviour == "crash":
    sys.exit(1)
if behaviour == "preempted":
    on_term(signal.SIGTERM, None)
if behaviour == "wait":
    time.sleep(120)
emit("finished", step=lines, tokens=lines)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address():
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths have a limit
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "1",
         "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--include-dashboard", "true", "--temp-dir", temp_dir,
         "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 120
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.time() > deadline or head.poll() is not None:
                    pytest.fail("the local Ray head did not come up within 120 s")
                time.sleep(2)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head and the processes it started, nothing else
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def request(tmp_path: Path, job_id: str, behaviour: str) -> LaunchRequest:
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text("name: demo\nmodel: tiny-llama\nmethod: lora\ndata: {path: train.jsonl}\n"
                         "local: {price_per_hour: 2.5, gpu: A100}\n")
    spec = load_spec(spec_path)
    # As the orchestrator's hourly plan places a CPU job: one CPU, which must not ask Ray for a
    # GPU (the test cluster has none, so such a job would stay pending).
    return LaunchRequest(job_id=job_id, spec=spec, node_spec=spec.node_spec(), run_dir=tmp_path / "runs" / job_id,
                         placements=(Placement("local", "this-machine", "CPU", 1, False, Decimal("2.5"), "local"),),
                         env={"SPOTUNE_RAY_RUN_ROOT": str(tmp_path / "node"), "STAND_IN_BEHAVIOUR": behaviour})


def wait_until(backend, external_id, states, timeout=90):
    deadline = time.time() + timeout
    while True:
        observation = backend.poll(external_id)
        if observation.state in states or time.time() > deadline:
            return observation
        time.sleep(1)


@pytest.fixture
def backend(tmp_path, ray_address):
    return RayBackend(tmp_path, address=ray_address, events_refresh_seconds=0,
                      recipe_command=f"python -c {shlex.quote(STAND_IN)}")


def test_a_finished_ray_job_is_one_attempt_priced_from_the_spec_with_its_events(tmp_path, backend):
    external_id = backend.submit(request(tmp_path, "ok-1", "finish"))
    final = wait_until(backend, external_id, {"succeeded", "failed"})

    assert final.state == "succeeded", final.detail
    (attempt,) = final.attempts
    assert (attempt.n, attempt.end_reason, attempt.placement.provider, attempt.placement.region) == (
        1, "finished", "ray", "127.0.0.1")
    assert attempt.placement.price_per_hour == Decimal("2.5")  # spec.local.price_per_hour
    assert attempt.ended_at >= attempt.started_at
    events = [json.loads(line) for line in final.events_path.read_text().splitlines()]
    # The stand-in read the staged spec and the data file shipped with it: three lines.
    assert [(e["event"], e.get("total_steps") or e.get("tokens")) for e in events] == [("start", 3), ("finished", 3)]
    followed = list(backend.logs(external_id, follow=True))  # streams, and ends with the job
    # Every event reaches the log (the final flush may repeat lines the live mirror already sent).
    assert len({line for line in followed if line.startswith("[spotune-event] {")}) == 2


def test_a_crashed_recipe_fails_the_job_with_its_exit_code(tmp_path, backend):
    external_id = backend.submit(request(tmp_path, "crash-1", "crash"))
    final = wait_until(backend, external_id, {"succeeded", "failed"})
    assert final.state == "failed"
    assert final.detail.startswith("exit code 1")
    assert final.attempts[0].end_reason == "failed"


def test_a_recipe_that_checkpoints_and_exits_75_ends_its_attempt_as_preempted(tmp_path, backend):
    """E.g. a node drained under the job: Ray does not resubmit, so the job is over, but the
    attempt is recorded as a preemption (the orchestrator may launch again and resume)."""
    external_id = backend.submit(request(tmp_path, "drain-1", "preempted"))
    final = wait_until(backend, external_id, {"succeeded", "failed"})
    assert final.state == "failed" and final.detail.startswith("exit code 75")
    assert final.attempts[0].end_reason == "preempted"


def test_cancel_stops_the_job_after_the_recipe_handles_sigterm(tmp_path, backend):
    external_id = backend.submit(request(tmp_path, "stop-1", "wait"))
    running = wait_until(backend, external_id, {"running"})
    assert running.state == "running" and running.attempts[0].ended_at is None
    deadline = time.time() + 60  # wait for the stand-in's start event before stopping it
    while time.time() < deadline and not any(
            line.startswith("[spotune-event] ") and '"start"' in line for line in backend.logs(external_id)):
        time.sleep(1)
    backend.cancel(external_id)
    final = wait_until(backend, external_id, {"cancelled", "failed", "succeeded"})
    assert final.state == "cancelled"
    assert final.attempts[0].end_reason == "cancelled"
    log = "\n".join(backend.logs(external_id))
    assert [json.loads(x)["event"] for x in final.events_path.read_text().splitlines()] == ["start", "preempted"], log


def test_no_cluster_address_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(BackendError, match=r"no Ray cluster address: set RAY_ADDRESS=http://<head>:8265"):
        RayBackend(tmp_path).submit(request(tmp_path, "x-1", "finish"))


def test_an_unreachable_cluster_is_one_clear_error(tmp_path):
    with pytest.raises(BackendError) as failure:
        RayBackend(tmp_path, address=f"http://127.0.0.1:{_free_port()}").submit(
            request(tmp_path, "x-2", "finish"))
    assert str(failure.value).startswith("cannot reach the Ray cluster at http://127.0.0.1:")
    assert "\n" not in str(failure.value)


def test_the_backend_describes_itself_on_the_protocol_without_a_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://head.example:8265")
    ray_backend = make_backend("ray", tmp_path)
    assert isinstance(ray_backend, RayBackend)
    assert (ray_backend.name, ray_backend.pricing, ray_backend.options, ray_backend.poll_seconds) == (
        "ray", "hourly", (), 2.0)
    assert ray_backend.device() == DeviceReport(None, 0, None)
    text = ray_backend.describe(request(tmp_path, "dry-1", "finish"))
    assert "python -m recipes.sft spec.yaml --run-dir ${SPOTUNE_RAY_RUN_ROOT:-$HOME/spotune-runs}/dry-1" in text
    assert f"working dir: {tmp_path / 'runs' / 'dry-1' / 'ray-job'}" in text
    assert "placement:   ray/head.example CPU at $2.50/h" in text
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    # `--price-per-hour` replaces spec.local.price_per_hour in the plan: the attempt is priced as planned.
    planned = request(tmp_path, "dry-2", "finish")
    planned = dataclasses.replace(planned, placements=(dataclasses.replace(planned.placements[0],
                                                                           price_per_hour=Decimal("3.1")),))
    assert "placement:   ray/head.example CPU at $3.10/h" in ray_backend.describe(planned)


def test_the_staged_spec_is_the_requests_node_spec_with_the_data_file_beside_it(tmp_path):
    """The node spec is the orchestrator's to write: staged as given, only data.path moved."""
    import yaml

    launch = request(tmp_path, "stage-1", "finish")
    launch.node_spec["batch"]["micro"] = 4
    stage = RayBackend._stage(launch)
    staged = yaml.safe_load((stage / "spec.yaml").read_text())
    assert staged == {**launch.node_spec, "data": {**launch.node_spec["data"], "path": "data/train.jsonl"}}
    assert (stage / "data" / "train.jsonl").read_text() == (tmp_path / "train.jsonl").read_text()
