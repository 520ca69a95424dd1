"""Two SkyPilot nodes on loopback: the run script of a real 2-node task, wrapped by SkyPilot's own
TaskCodeGen.build_task_bash_script and log_lib.make_task_bash_script, run twice at once with the
variables SkyPilot's add_task gives each node (sky/backends/task_codegen.py): SKYPILOT_NODE_IPS
(the head first), SKYPILOT_NODE_RANK, SKYPILOT_NUM_NODES, SKYPILOT_NUM_GPUS_PER_NODE (0 on a CPU
node). Each "node" has a home of its own; the checkpoint store (a file:// URL, written directly
as from a cloud that cannot mount a bucket) is shared. Nothing is a stub: torchrun, gloo, the
recipe training the tiny model, the node helper. Only the cloud's provisioning does not happen.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file
from sky_catalog import catalog_offers, seeded_runtime, sky_with_seeded_catalog

from contract.backend import LaunchRequest
from contract.events import read_jsonl
from contract.placement import Placement
from contract.spec import load_spec
from launch.event_log import EVENT_LOG_PREFIX, merge_events
from launch.sky_clouds import EnabledClouds
from launch.sky_task import NODE_DATA_DIR, build_task

sky = sky_with_seeded_catalog()
REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "recipes" / "sample_data" / "json_demo.jsonl"
JOB = "tiny-multinode-20261130-ab12"
ADAPTER = "adapter_model.safetensors"
# No bucket SkyPilot could mount: the recipe writes the store itself, as it does from RunPod or Vast.
NO_STORAGE = EnabledClouds(compute=frozenset({"aws"}), storage=frozenset())

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _sky_runtime(monkeypatch):
    monkeypatch.setenv("SKY_RUNTIME_DIR", seeded_runtime())


def two_node_task(tmp_path: Path, max_steps: int):
    """The task `spotune launch --backend skypilot` would submit for 2 nodes of p4d.24xlarge."""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "tiny-multinode", "model": "tiny-llama", "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(DEMO_DATA), "format": "alpaca"}, "seq_len": 256, "epochs": 1,
        "batch": {"micro": 1, "global": 2},  # one block per process on 2 nodes, two on one
        "checkpoint": {"every_steps": 2, "every_minutes": None, "keep": 2},
        "train": {"max_steps": max_steps, "log_every_steps": 1, "seed": 1}}))
    spec = load_spec(tmp_path / "spec.yaml")
    offer = next(o for o in catalog_offers() if (o.provider, o.region, o.instance_type) == ("aws", "us-east-2", "p4d.24xlarge"))
    placement = Placement(offer.provider, offer.region, offer.gpu, offer.gpu_count, True, offer.price(True) * 2,
                          offer.instance_type, num_nodes=2)
    request = LaunchRequest(job_id=JOB, spec=spec, node_spec=spec.node_spec(), run_dir=tmp_path / "state" / "runs" / JOB,
                            placements=(placement,), env={"SPOTUNE_JOB_ID": JOB})
    task, skipped = build_task(request, clouds=NO_STORAGE)
    assert skipped == [] and task.num_nodes == 2 and not task.storage_mounts
    return task


class Cluster:
    """The task's nodes on this machine: per node a home of its own, one shared store."""

    def __init__(self, root: Path, task, nodes: int = 2):
        from sky.backends.task_codegen import TaskCodeGen
        from sky.skylet import log_lib

        self.root, self.task, self.nodes = root, task, nodes
        root.mkdir(parents=True, exist_ok=True)
        self.store = f"file://{root / 'store' / JOB}"
        node_spec = yaml.safe_load(task.envs["SPOTUNE_SPEC_YAML"])
        # Where SkyPilot copies the staged data folder on each node (NODE_DATA_DIR), here in place.
        staged = Path(task.file_mounts[NODE_DATA_DIR])
        node_spec["data"]["path"] = str(staged / Path(node_spec["data"]["path"]).name)
        self.node_spec = node_spec
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.scripts = []
        for rank in range(nodes):
            envs = {**task.envs, "SPOTUNE_STORE": self.store, "SPOTUNE_OUTPUT_URL": f"{self.store}/output",
                    "SPOTUNE_SPEC_YAML": yaml.safe_dump(node_spec, sort_keys=False),
                    # What SkyPilot's add_task sets for each node of the gang.
                    "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * nodes), "SKYPILOT_NODE_RANK": str(rank),
                    "SKYPILOT_NUM_NODES": str(task.num_nodes), "SKYPILOT_NUM_GPUS_PER_NODE": "0",
                    "SPOTUNE_RDZV_PORT": str(port)}  # a free port: tests may run side by side
            script = root / f"node{rank}.sh"
            script.write_text(log_lib.make_task_bash_script(TaskCodeGen.build_task_bash_script(task.run), env_vars=envs))
            self.scripts.append(script)

    def home(self, rank: int, boot: int = 0) -> Path:
        return self.root / f"boot{boot}" / f"node{rank}"

    def run_dir(self, rank: int, boot: int = 0) -> Path:
        return self.home(rank, boot) / "spotune-run" / JOB

    def start(self, boot: int = 0) -> list[subprocess.Popen]:
        """Every node's run at once, as SkyPilot's gang does; a new boot is a new cluster (fresh homes)."""
        procs = []
        for rank, script in enumerate(self.scripts):
            home = self.home(rank, boot)
            (home / "sky_workdir").mkdir(parents=True)
            env = {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                   "PYTHONPATH": str(REPO), "LANG": "C.UTF-8",
                   "OMP_NUM_THREADS": "1"}  # two "nodes" share this machine's cores
            procs.append(subprocess.Popen(["/bin/bash", "-i", str(script)], env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True))
        return procs


def finish(procs) -> list[tuple[int, str]]:
    logs = [p.communicate(timeout=300)[0] for p in procs]
    return [(p.returncode, log) for p, log in zip(procs, logs)]


def mirrored_events(log: str) -> list[dict]:
    """The events as the backend reads them from the job log (launch/skypilot.py: merge_events)."""
    with tempfile.TemporaryDirectory() as d:
        return read_jsonl(merge_events(log.splitlines(), Path(d) / "events.jsonl"))


def single_process_run(tmp_path: Path, node_spec: dict) -> Path:
    spec, run_dir = tmp_path / "single.yaml", tmp_path / "single"
    spec.write_text(yaml.safe_dump(node_spec))
    done = subprocess.run([sys.executable, "-m", "recipes.sft", str(spec), "--run-dir", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def step_losses(events) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["event"] == "step"}


def assert_same_weights(got: Path, want: Path, tol: float) -> None:
    got, want = load_file(got), load_file(want)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol, msg=name)


STEPS = 8  # checkpoints at 2, 4 and 6; the last step writes the output instead


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """An uninterrupted 2-node run: (cluster, [(exit status, log) per node])."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cluster = Cluster(root, two_node_task(root, max_steps=STEPS))
    return cluster, finish(cluster.start())


def test_two_nodes_train_as_one_process_would_and_only_the_head_reports_and_publishes(two_nodes, tmp_path):
    cluster, [(head_rc, head_log), (worker_rc, worker_log)] = two_nodes
    assert (head_rc, worker_rc) == (0, 0), head_log[-3000:] + worker_log[-3000:]

    # The head's log carries the events (rank 0 is on the head: static rendezvous by node rank).
    events = mirrored_events(head_log)
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, STEPS + 1))
    assert [e["event"] for e in events if e["event"] in ("start", "finished")] == ["start", "finished"]
    assert EVENT_LOG_PREFIX not in worker_log
    assert "node 1: the recipe exited 0; the head node reports the job's status" in worker_log

    # One world of 2 ranks over 2 nodes trains what one process does with the same global batch.
    single = single_process_run(tmp_path, cluster.node_spec)
    want = step_losses(read_jsonl(single / "events.jsonl"))
    for step, loss in step_losses(events).items():
        assert loss == pytest.approx(want[step], rel=1e-4), step
    store = Path(cluster.store.removeprefix("file://"))
    assert_same_weights(store / "output" / ADAPTER, single / "output" / ADAPTER, 1e-4)

    # Checkpoints: written once per step, by rank 0, into the shared store; the worker wrote nothing.
    saved = [e for e in events if e["event"] == "checkpoint"]
    assert [e["step"] for e in saved] == [2, 4, 6]
    assert sorted(p.name for p in (store / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]  # keep: 2
    assert [Path(e["path"]).name for e in saved] == ["step-00000002", "step-00000004", "step-00000006"]
    worker_dir = cluster.run_dir(1)
    assert not (worker_dir / "events.jsonl").exists() and not (worker_dir / "output").exists()
    manifest = json.loads((store / "output" / "spotune-output.json").read_text())
    assert ADAPTER in [f["path"] for f in manifest["files"]]


def kill_node(proc: subprocess.Popen) -> None:
    """The node is gone: its shell and everything it started, at once."""
    node = psutil.Process(proc.pid)
    for p in [*node.children(recursive=True), node]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_a_lost_worker_node_restarts_the_whole_job_from_the_last_checkpoint_exactly(two_nodes, tmp_path):
    """Node 1 dies mid-run: the head's ranks fail with it and the head reports a crash SkyPilot
    retries (76, counted in the store); the job's next cluster (fresh nodes, the same store)
    resumes from the last complete checkpoint and ends with the weights of an uninterrupted run."""
    reference, _ = two_nodes
    cluster = Cluster(tmp_path, reference.task)
    procs = cluster.start(boot=0)
    events_file = cluster.run_dir(0, boot=0) / "events.jsonl"
    deadline = time.monotonic() + 240
    while not any(e["event"] == "checkpoint" for e in read_jsonl(events_file) if events_file.exists()):
        assert time.monotonic() < deadline and procs[0].poll() is None, "no checkpoint before the head ended"
        time.sleep(0.05)
    kill_node(procs[1])
    (head_rc, head_log), _ = finish(procs)
    first = mirrored_events(head_log)
    assert head_rc == 76, head_log[-3000:]
    assert not any(e["event"] == "finished" for e in first), "the run ended before the node was lost"
    store = Path(cluster.store.removeprefix("file://"))
    assert (store / "crash-restarts").read_text() == "1"

    (head_rc, head_log), (worker_rc, _) = finish(cluster.start(boot=1))
    assert (head_rc, worker_rc) == (0, 0), head_log[-3000:]
    resumed = mirrored_events(head_log)
    start = next(e for e in resumed if e["event"] == "start")
    assert start["resumed_from_step"] == max(e["step"] for e in first if e["event"] == "checkpoint")
    ref_store = Path(reference.store.removeprefix("file://"))
    assert_same_weights(store / "output" / ADAPTER, ref_store / "output" / ADAPTER, 1e-5)
