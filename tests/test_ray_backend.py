"""RayBackend against a real Ray head started on loopback for this module. The recipe is replaced
by a trivial stand-in that speaks the recipe contract (reads the staged spec and data, writes
events.jsonl, exits 0 / 1 / 75 on SIGTERM): these tests are about the Ray job around the recipe.
tests/test_ray_train.py runs the real recipe under Ray Train on a two-node cluster."""
from __future__ import annotations

import dataclasses
import json
import shlex
import time
from decimal import Decimal
from pathlib import Path

import pytest

from contract.backend import BackendError, DeviceReport, LaunchRequest, make_backend
from contract.placement import Placement
from contract.spec import load_spec
from launch.ray import RayBackend, attempts_of
from ray_cluster import RayCluster, free_port

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


@pytest.fixture(scope="module")
def cluster():
    started = RayCluster().start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def ray_address(cluster):
    return cluster.dashboard


def request(tmp_path: Path, job_id: str, behaviour: str, prices: str = "{default: 2.5}") -> LaunchRequest:
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text("name: demo\nmodel: tiny-llama\nmethod: lora\ndata: {path: train.jsonl}\n"
                         f"local: {{price_per_hour: 9.0, gpu: A100}}\nray: {{price_per_node_hour: {prices}}}\n")
    spec = load_spec(spec_path)
    # As the orchestrator's hourly plan places a CPU job: one CPU worker, which must not ask Ray
    # for a GPU (the test cluster has none, so such a job would stay pending).
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


def test_a_finished_ray_job_is_one_attempt_priced_from_the_clusters_node_with_its_events(tmp_path, backend):
    external_id = backend.submit(request(tmp_path, "ok-1", "finish"))
    final = wait_until(backend, external_id, {"succeeded", "failed"})

    assert final.state == "succeeded", final.detail
    (attempt,) = final.attempts
    assert (attempt.n, attempt.end_reason, attempt.placement.provider, attempt.placement.region) == (
        1, "finished", "ray", "127.0.0.1")
    # The one node a one-worker job uses, at ray.price_per_node_hour.default (not local.price_per_hour).
    assert (attempt.placement.price_per_hour, attempt.placement.num_nodes) == (Decimal("2.5"), 1)
    assert attempt.ended_at >= attempt.started_at
    events = [json.loads(line) for line in final.events_path.read_text().splitlines()]
    # The stand-in read the staged spec and the data file shipped with it: three lines.
    assert [(e["event"], e.get("total_steps") or e.get("tokens")) for e in events] == [("start", 3), ("finished", 3)]
    followed = list(backend.logs(external_id, follow=True))  # streams, and ends with the job
    # Every event reaches the log (the final flush may repeat lines the live mirror already sent).
    assert len({line for line in followed if line.startswith("[spotune-event] {")}) == 2

    # A launch that died before recording the id finds it again; one whose submit never reached the
    # cluster (its state written ahead, or nothing written) finds nothing, and is submitted afresh.
    assert backend.find("ok-1", tmp_path / "runs" / "ok-1") == external_id
    assert backend.find("never-1", tmp_path / "runs" / "never-1") is None
    RayBackend._save(tmp_path / "runs" / "lost-1", {"submission_id": "spotune-lost-1"})
    assert backend.find("lost-1", tmp_path / "runs" / "lost-1") is None


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
        RayBackend(tmp_path, address=f"http://127.0.0.1:{free_port()}").submit(
            request(tmp_path, "x-2", "finish"))
    assert str(failure.value).startswith("cannot reach the Ray cluster at http://127.0.0.1:")
    assert "\n" not in str(failure.value)


def test_the_backend_describes_itself_on_the_protocol_without_a_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://head.example:8265")
    ray_backend = make_backend("ray", tmp_path)
    assert isinstance(ray_backend, RayBackend)
    assert (ray_backend.name, ray_backend.pricing, ray_backend.options, ray_backend.poll_seconds,
            ray_backend.max_nodes) == ("ray", "hourly", (), 2.0, None)
    assert ray_backend.device() == DeviceReport(None, 0, None)
    text = ray_backend.describe(request(tmp_path, "dry-1", "finish"))
    assert ("python -m recipes.ray_train spec.yaml --run-dir ${SPOTUNE_RAY_RUN_ROOT:-$HOME/spotune-runs}/dry-1 "
            "--workers 1 --max-failures 2   (events mirrored") in text
    assert "ray train:   1 worker x 1 CPU, up to 2 restarts from the last checkpoint" in text
    assert f"working dir: {tmp_path / 'runs' / 'dry-1' / 'ray-job'}" in text
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    # A plan of 2 nodes x 4 GPUs: 8 workers, one GPU each.
    planned = request(tmp_path, "dry-2", "finish")
    planned = dataclasses.replace(planned, placements=(Placement("aws", "us-east-1", "A100", 4, False, Decimal("40"),
                                                                 "p4d", 2),))
    assert "--workers 8 --max-failures 2 --gpus-per-worker 1" in ray_backend.describe(planned)
    assert "ray train:   8 workers x 1 GPU" in ray_backend.describe(planned)


def test_a_cluster_node_without_a_price_refuses_the_job_before_anything_runs(tmp_path, ray_address):
    """A $0 Ray job is never recorded silently: the spec prices no node type and has no default."""
    from ray.job_submission import JobSubmissionClient

    ray_backend = RayBackend(tmp_path, address=ray_address)
    with pytest.raises(BackendError) as refused:
        ray_backend.submit(request(tmp_path, "free-1", "finish", prices="{}"))
    assert str(refused.value).startswith("no price for the Ray node at ")
    assert "set ray.price_per_node_hour.default in the spec" in str(refused.value) and "\n" not in str(refused.value)
    assert "spotune-free-1" not in {job.submission_id for job in JobSubmissionClient(ray_address).list_jobs()}
    assert not (tmp_path / "runs" / "free-1").exists()


def test_the_driver_names_the_recipe_dependencies_a_node_lacks(cluster):
    """recipes.ray_train checks every node before Ray Train starts: here for a package no node has."""
    import ray

    from recipes.ray_train import check_dependencies

    repo = Path(__file__).resolve().parents[1]
    ray.init(address=cluster.gcs_address, runtime_env={"py_modules": [str(repo / "recipes"), str(repo / "contract")]},
             log_to_driver=False)
    try:
        assert check_dependencies(ray) is None  # torch, transformers and peft are there
        problem = check_dependencies(ray, ("torch", "no_such_package_for_spotune"))
    finally:
        ray.shutdown()
    (node,) = cluster.alive_nodes()
    assert problem == (f"the Ray cluster lacks the recipe's dependencies (no_such_package_for_spotune on {node.node_ip}): "
                       "install spotune's train extra in the cluster's Python (pip install 'spotune[train]')")


def test_each_worker_group_start_is_an_attempt_and_one_that_ended_without_a_word_failed():
    """Attempt numbers are the recipe's; a group Ray Train replaced without an event from it ended
    when the next began, and the last attempt ends with the job."""
    from types import SimpleNamespace

    where = Placement("ray", "head", "CPU", 1, False, Decimal("2.5"), None, 2)
    info = SimpleNamespace(start_time=1_000_000, end_time=1_090_000, driver_exit_code=0, message="")
    events = [{"event": "start", "attempt": 1, "time": 1005.0}, {"event": "step", "attempt": 1, "time": 1010.0},
              {"event": "start", "attempt": 2, "time": 1040.0, "resumed_from_step": 1},
              {"event": "finished", "attempt": 2, "time": 1080.0}]
    first, second = attempts_of(events, where, info, "SUCCEEDED", "spotune-x")
    assert (first.n, first.end_reason, first.ended_at.timestamp(), first.started_at.timestamp()) == (
        1, "failed", 1040.0, 1000.0)
    assert (second.n, second.end_reason, second.started_at.timestamp(), second.ended_at.timestamp()) == (
        2, "finished", 1040.0, 1090.0)
    assert "Ray Train restarted it" in first.detail


def test_ray_trains_word_on_a_lost_worker_comes_before_a_surviving_ranks_crash():
    """Killing one worker makes the other fail too (gloo: connection closed by peer): the attempt's
    reason is the worker Ray Train lost, whichever of the two was written first."""
    from types import SimpleNamespace

    where = Placement("ray", "head", "CPU", 1, False, Decimal("2.5"), None, 2)
    info = SimpleNamespace(start_time=1_000_000, end_time=None, driver_exit_code=None, message="")
    events = [{"event": "start", "attempt": 1, "time": 1005.0},
              {"event": "error", "attempt": 1, "time": 1020.0, "kind": "crash", "message": "RuntimeError: Connection closed by peer"},
              {"event": "error", "attempt": 1, "time": 1021.0, "kind": "worker_lost",
               "message": "Ray Train lost the worker group (rank 1: ActorDiedError)"},
              {"event": "start", "attempt": 2, "time": 1040.0, "resumed_from_step": 1}]
    first, second = attempts_of(events, where, info, "RUNNING", "spotune-x")
    assert (first.end_reason, first.detail, first.ended_at.timestamp()) == (
        "failed", "Ray Train lost the worker group (rank 1: ActorDiedError)", 1021.0)
    assert (second.started_at.timestamp(), second.ended_at, second.end_reason) == (1021.0, None, None)


def test_the_staged_spec_is_the_requests_node_spec_with_the_data_file_beside_it(tmp_path):
    """The node spec is the orchestrator's to write: staged as given, only data.path moved."""
    import yaml

    launch = request(tmp_path, "stage-1", "finish")
    launch.node_spec["batch"]["micro"] = 4
    stage = RayBackend._stage(launch)
    staged = yaml.safe_load((stage / "spec.yaml").read_text())
    assert staged == {**launch.node_spec, "data": {**launch.node_spec["data"], "path": "data/train.jsonl"}}
    assert (stage / "data" / "train.jsonl").read_text() == (tmp_path / "train.jsonl").read_text()


def test_a_node_that_is_a_cloud_instance_is_priced_from_the_catalog_the_orchestrator_passes(tmp_path):
    """Ray reports no prices: a node labelled with an instance type the planner's catalog lists costs
    that instance's on-demand price (orchestrator.jobs.instance_prices, carried by the request)."""
    from orchestrator.catalog import load_offers
    from orchestrator.jobs import instance_prices

    prices = instance_prices()
    g5 = min(o.price_on_demand for o in load_offers() if o.instance_type == "g5.xlarge" and o.price_on_demand)
    assert prices["g5.xlarge"] == g5
    node = {"NodeID": "n1", "Alive": True, "NodeManagerAddress": "10.0.0.1", "NodeName": "10.0.0.1",
            "Resources": {"CPU": 4.0, "GPU": 1.0}, "Labels": {"instance-type": "g5.xlarge"}}
    backend = RayBackend(tmp_path, address="http://127.0.0.1:1", nodes=lambda: [node])
    launch = dataclasses.replace(request(tmp_path, "catalog-1", "finish", prices="{}"), instance_prices=prices)
    placement, lines = backend._price(launch, "A10G", 1, 1)
    assert (placement.price_per_hour, placement.num_nodes) == (g5, 1)
    assert "catalog" in " ".join(lines)


def gpu_node(node_id: str, gpus: int, accelerator: str = "H100") -> dict:
    return {"NodeID": node_id, "Alive": True, "NodeManagerAddress": f"10.0.0.{len(node_id)}", "NodeName": node_id,
            "Resources": {"CPU": 96.0, "GPU": float(gpus), f"accelerator_type:{accelerator}": 1.0},
            "Labels": {"ray.io/accelerator-type": accelerator}}


def test_the_cluster_reports_its_gpu_type_gpus_per_node_and_nodes(tmp_path):
    nodes = [gpu_node("a", 8), gpu_node("b", 8), gpu_node("c", 4), gpu_node("d", 1, "L4")]
    report = RayBackend(tmp_path, nodes=lambda: nodes).device()
    assert (report.gpu, report.count, report.nodes) == ("H100", 4, 3)
    cpu_only = [{"NodeID": n, "Alive": True, "Resources": {"CPU": 1.0}, "Labels": {}} for n in "xy"]
    assert RayBackend(tmp_path, nodes=lambda: cpu_only).device() == DeviceReport(None, 0, None, nodes=2)


def test_a_70b_full_fine_tune_plans_over_as_many_cluster_nodes_as_it_needs(tmp_path):
    """One 8xH100 node cannot hold a 70B full fine-tune's states; the cluster's nodes can, sharded."""
    import yaml

    from orchestrator.jobs import make_job_plan

    config = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "llama3.1-70b-full-multinode.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["data"].pop("path")
    raw["constraints"] = {"max_nodes": 4}
    raw["local"] = {"price_per_hour": 30.0}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    spec = load_spec(tmp_path / "spec.yaml")
    backend = RayBackend(tmp_path, nodes=lambda: [gpu_node(n, 8) for n in "abcd"])
    best = make_job_plan(spec, backend).best
    assert (best.placement.gpu, best.placement.gpu_count, best.placement.num_nodes) == ("H100", 8, 2)
    assert best.placement.price_per_hour == Decimal("60.0")
    assert best.execution.world_size == 16 and best.execution.sharding == "fsdp"
    one_node = RayBackend(tmp_path, nodes=lambda: [gpu_node("a", 8)])
    with pytest.raises(Exception, match="does not fit"):
        make_job_plan(spec, one_node)
