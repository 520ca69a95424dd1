"""The recipe under Ray Train on a real local Ray cluster: a head and one worker node, one CPU each,
so the two TorchTrainer workers train over gloo on different Ray nodes.

Jobs go through RayBackend as the CLI submits them (a Ray job whose driver is recipes.ray_train),
with the shared run dir on this machine's disk; the ledger test watches one through the
orchestrator's Watcher. Three jobs train the tiny LoRA model: a single process (the reference),
two Ray Train workers, and two workers of which one is SIGKILLed mid-run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ray.train")

from safetensors.torch import load_file  # noqa: E402

from contract.backend import LaunchRequest  # noqa: E402
from contract.events import read_jsonl  # noqa: E402
from contract.placement import Placement  # noqa: E402
from contract.spec import load_spec  # noqa: E402
from launch.ray import RayBackend  # noqa: E402
from ledger_factory import make_plan  # noqa: E402
from orchestrator.ledger import Ledger  # noqa: E402
from orchestrator.watch import Watcher  # noqa: E402
from ray_cluster import RayCluster  # noqa: E402
from tiny_jobs import REPO, write_spec  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 6
NODE_PRICE = Decimal("1.25")


@pytest.fixture(scope="module")
def cluster():
    started = RayCluster().start(worker_nodes=1)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    # Two blocks a step, one per worker; a checkpoint every step, so a kill loses at most one.
    return write_spec(tmp_path_factory.mktemp("spec"), "ray-train", batch={"micro": 1, "global": 2},
                      train__max_steps=STEPS, ray={"price_per_node_hour": {"default": float(NODE_PRICE)},
                                                   "max_failures": 2})


def two_workers(spec_path: Path, base: Path, job_id: str) -> tuple[LaunchRequest, Path]:
    """The request the orchestrator makes for a plan of 2 nodes x 1 CPU, and its shared run dir."""
    spec = load_spec(spec_path)
    request = LaunchRequest(job_id=job_id, spec=spec, node_spec=spec.node_spec(), run_dir=base / "state" / "runs" / job_id,
                            placements=(Placement("local", "this-machine", "CPU", 1, False, Decimal("2.73"), None, 2),),
                            env={"SPOTUNE_RAY_RUN_ROOT": str(base / "shared"), "SPOTUNE_JOB_ID": job_id})
    return request, base / "shared" / job_id


def wait_for(backend: RayBackend, external_id: str, timeout: float = 300):
    deadline = time.time() + timeout
    while True:
        observation = backend.poll(external_id)
        if observation.state in ("succeeded", "failed", "cancelled") or time.time() > deadline:
            return observation
        time.sleep(2)


def step_losses(run_dir: Path, attempt=None) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_jsonl(run_dir / "events.jsonl")
            if e["event"] == "step" and (attempt is None or e["attempt"] == attempt)}


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "output" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def single(spec_path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    result = subprocess.run([sys.executable, "-m", "recipes.sft", str(spec_path), "--run-dir", str(run_dir)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(cluster, spec_path, tmp_path_factory):
    base = tmp_path_factory.mktemp("uninterrupted")
    backend = RayBackend(base / "state", address=cluster.dashboard, events_refresh_seconds=0)
    request, shared = two_workers(spec_path, base, "rt-whole")
    final = wait_for(backend, backend.submit(request))
    assert final.state == "succeeded", (final.detail, "\n".join(list(backend.logs("spotune-rt-whole"))[-40:]))
    return final, shared


def test_two_ray_train_workers_on_two_nodes_train_as_one_process_does(single, uninterrupted):
    final, shared = uninterrupted
    (attempt,) = final.attempts
    # Priced from the cluster: both one-CPU nodes, at ray.price_per_node_hour.default each.
    assert (attempt.n, attempt.end_reason, attempt.placement.provider, attempt.placement.num_nodes) == (
        1, "finished", "ray", 2)
    assert attempt.placement.price_per_hour == 2 * NODE_PRICE
    (start,) = [e for e in read_jsonl(shared / "events.jsonl") if e["event"] == "start"]
    assert (start["attempt"], start["resumed_from_step"], start["grad_accum"]) == (1, None, 1)  # one block per rank
    reference, got = step_losses(single), step_losses(shared)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step], rel=1e-4, abs=1e-4), step
    # Ray Train's latest checkpoint is the recipe's newest one, reported as it was written.
    snapshot = (shared / "checkpoint_manager_snapshot.json").read_text()
    newest = sorted(p.name for p in (shared / "checkpoints").iterdir() if p.name.startswith("step-"))[-1]
    assert f'"latest_checkpoint_result":{{"version":0,"checkpoint_dir_name":"checkpoints/{newest}"' in snapshot


def _kill_a_worker_after(cluster: RayCluster, shared: Path, step: int, timeout: float = 300) -> int:
    """SIGKILL one RayTrainWorker process once attempt 1 has logged `step` (checkpointed each step)."""
    from ray.util.state import list_actors

    deadline = time.time() + timeout
    while not any(e["event"] == "step" and e["step"] >= step for e in read_jsonl(shared / "events.jsonl")):
        assert time.time() < deadline, "attempt 1 made no progress"
        time.sleep(0.1)
    workers = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker"),
                                                              ("state", "=", "ALIVE")])
    victim = max(worker.pid for worker in workers)
    os.kill(victim, signal.SIGKILL)
    return victim


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint_and_the_ledger_has_both_attempts(
        cluster, spec_path, tmp_path, uninterrupted):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    spec = load_spec(spec_path)
    job_id = ledger.create_job(spec, spec_path.read_text(), "ray", make_plan(job=spec.name), 1)
    backend = RayBackend(tmp_path / "state", address=cluster.dashboard, events_refresh_seconds=0)
    request, shared = two_workers(spec_path, tmp_path, job_id)
    external_id = backend.submit(request)
    ledger.set_external_id(job_id, external_id)

    _kill_a_worker_after(cluster, shared, step=2)
    tick = Watcher(ledger, job_id, backend, external_id, poll_seconds=2).watch(timeout=400)

    assert tick.backend_state == "succeeded", tick.detail
    first, second = ledger.attempts(job_id)
    assert (first.n, first.end_reason, second.n, second.end_reason) == (1, "failed", 2, "finished")
    assert first.detail.startswith("Ray Train lost the worker group"), first.detail
    assert first.ended_at <= second.started_at and Decimal(second.price_per_hour) == 2 * NODE_PRICE
    assert ledger.get_job(job_id).status == "succeeded"
    events = read_jsonl(shared / "events.jsonl")
    starts = [e for e in events if e["event"] == "start"]
    resumed = starts[1]["resumed_from_step"]
    # From the newest checkpoint attempt 1 completed (the kill may land inside the next save).
    saved = [e["step"] for e in events if e["event"] == "checkpoint" and e["attempt"] == 1]
    assert [e["attempt"] for e in starts] == [1, 2] and resumed >= max(saved) >= 1
    # The restarted group picks up exactly where the checkpoint left off.
    whole = uninterrupted[1]
    reference = step_losses(whole)
    for step, loss in step_losses(shared, attempt=2).items():
        assert step > resumed and loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    got, want = adapter(shared), adapter(whole)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_cancel_reaches_the_workers_which_save_the_last_step_before_the_job_stops(cluster, spec_path, tmp_path):
    """Ray's stop_job signals the driver only; the workers, which no signal reaches, hear of it from
    the driver and checkpoint the last completed step, as the recipe does on SIGTERM."""
    backend = RayBackend(tmp_path / "state", address=cluster.dashboard, events_refresh_seconds=0)
    request, shared = two_workers(spec_path, tmp_path, "rt-cancel")
    external_id = backend.submit(request)
    deadline = time.time() + 300
    while not any(e["event"] == "step" for e in read_jsonl(shared / "events.jsonl")):
        assert time.time() < deadline, "no step before the cancel"
        time.sleep(0.1)
    backend.cancel(external_id)
    final = wait_for(backend, external_id)

    assert final.state == "cancelled" and [a.end_reason for a in final.attempts] == ["cancelled"]
    events = read_jsonl(shared / "events.jsonl")
    stops = [e for e in events if e["event"] == "preempted"]
    assert len(stops) == 1, "\n".join(list(backend.logs(external_id))[-30:])
    (stopped,) = stops
    assert stopped["signal"] == "SIGTERM" and stopped["step"] < STEPS
    assert stopped["step"] in [e["step"] for e in events if e["event"] == "checkpoint"]
    assert not any(e["event"] == "finished" for e in events)
