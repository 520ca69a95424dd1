"""Stopping inside the grace period, with checkpoints the recipe uploads to S3 itself (moto's server on loopback).

A step here accumulates 32 micro-batches of one block each, so it lasts about a second or more
on CPU: long enough for SIGTERM to land inside it. The recipe drops the partial step, saves the
last completed one at once and exits 75; a new node (a fresh run dir) resumes from the store and
ends with the same adapter, bit for bit, as a run that was never interrupted. How fast the
stop is goes in bench/bench_stop.py, not here.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("s3fs")
pytest.importorskip("moto")

from safetensors.torch import load_file  # noqa: E402

from contract.events import read_jsonl  # noqa: E402
from recipes.checkpoint import MANIFEST, REQUIRED_FILES, checkpoint_step  # noqa: E402
from s3_server import HoldingProxy, moto_s3, new_bucket, object_keys, s3_env  # noqa: E402
from waiting import wait_until  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "configs" / "tiny-demo.yaml"
STEPS = 4


def long_step_spec(directory: Path, every_steps=None) -> Path:
    """tiny-demo with a long accumulation step (global 32 blocks, one per micro-batch) and dropout,
    which draws from the RNG that a stop must hand back exactly."""
    spec = yaml.safe_load(DEMO.read_text())
    spec["data"]["path"] = str((DEMO.parent / spec["data"]["path"]).resolve())
    spec["batch"] = {"global": 32, "micro": 1}
    spec["train"]["max_steps"] = STEPS
    spec["lora"]["dropout"] = 0.1
    spec["checkpoint"] = {"every_steps": every_steps, "every_minutes": None, "keep": 2}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def recipe(spec: Path, run_dir: Path, *extra: str, env=None) -> subprocess.Popen:
    # One thread: on a shared CPU, OpenMP threads of parallel recipes spin against each other and a
    # step takes ten times longer. Every run here uses the same, so the bits still compare.
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "recipes.sft", str(spec), "--run-dir", str(run_dir), *extra],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> int:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode in (0, 75), stderr[-3000:]
    return process.returncode


def events_of(run_dir: Path, name: str) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == name]


def losses(run_dir: Path, attempt: int) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events_of(run_dir, "step") if e["attempt"] == attempt}


def assert_same_adapter_bits(run_dir: Path, reference: Path) -> None:
    got = load_file(run_dir / "output" / "adapter_model.safetensors")
    want = load_file(reference / "output" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def sigterm_inside_a_step(process: subprocess.Popen, run_dir: Path, after_step: int) -> None:
    """SIGTERM at a random moment after `after_step` finished: inside the next step, which lasts
    longer than the wait."""
    wait_until(lambda: process.poll() is not None or any(e["step"] >= after_step for e in events_of(run_dir, "step")),
               timeout=300, every=0.02)
    if process.poll() is not None:
        raise AssertionError(f"the recipe ended before it could be stopped: {process.communicate()[1][-3000:]}")
    time.sleep(random.uniform(0.05, 0.5))
    process.send_signal(signal.SIGTERM)


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """(endpoint, a fresh bucket, the environment a node gets: fake credentials + the endpoint).
    This process gets the same environment, to look into the store as a node would."""
    import s3fs

    for name, value in s3_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    return s3_endpoint, new_bucket(s3_endpoint), dict(os.environ)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("uninterrupted")
    run_dir = base / "run"
    assert finish(recipe(long_step_spec(base), run_dir)) == 0
    return run_dir


def test_sigterm_mid_step_saves_the_last_completed_step_and_a_new_node_resumes_it_exactly(tmp_path, s3, uninterrupted):
    endpoint, bucket, env = s3
    url = f"s3://{bucket}/job-1/checkpoints"
    spec, first_node = long_step_spec(tmp_path), tmp_path / "node-1"
    process = recipe(spec, first_node, "--checkpoint-dir", url, env=env)
    sigterm_inside_a_step(process, first_node, after_step=1)
    assert finish(process) == 75

    preempted, = events_of(first_node, "preempted")
    completed = max(e["step"] for e in events_of(first_node, "step"))
    assert preempted["signal"] == "SIGTERM" and preempted["step"] == completed < STEPS
    checkpoint, = events_of(first_node, "checkpoint")
    assert checkpoint["step"] == completed and checkpoint["path"] == f"{url}/step-{completed:08d}"

    # The checkpoint in S3 verifies, byte for byte, with everything a resume needs.
    from recipes.object_store import ObjectCheckpoints

    path, skipped = ObjectCheckpoints(url, tmp_path / "verify").find_resumable(REQUIRED_FILES)
    assert skipped == [] and checkpoint_step(path) == completed

    # A new node: nothing local, so the attempt number comes from the event log kept in S3.
    second_node = tmp_path / "node-2"
    assert finish(recipe(spec, second_node, "--checkpoint-dir", url, env=env)) == 0
    start = events_of(second_node, "start")[-1]
    assert start["attempt"] == 2 and start["resumed_from_step"] == completed
    assert [e["attempt"] for e in events_of(second_node, "start")] == [1, 2]
    resumed = losses(second_node, attempt=2)
    assert sorted(resumed) == list(range(completed + 1, STEPS + 1))
    assert resumed == {step: loss for step, loss in losses(uninterrupted, attempt=1).items() if step > completed}
    assert_same_adapter_bits(second_node, uninterrupted)
    assert "job-1/checkpoints/events.jsonl" in object_keys(endpoint, bucket, "job-1/")


def test_sigterm_mid_step_with_a_local_checkpoint_dir_resumes_exactly(tmp_path, uninterrupted):
    spec, run_dir = long_step_spec(tmp_path), tmp_path / "run"
    process = recipe(spec, run_dir)
    sigterm_inside_a_step(process, run_dir, after_step=2)
    assert finish(process) == 75
    stopped_at = events_of(run_dir, "preempted")[0]["step"]
    assert [e["step"] for e in events_of(run_dir, "checkpoint")] == [stopped_at]

    assert finish(recipe(spec, run_dir, env={**os.environ, "SPOTUNE_ATTEMPT": "2"})) == 0
    assert events_of(run_dir, "start")[-1]["resumed_from_step"] == stopped_at
    assert_same_adapter_bits(run_dir, uninterrupted)


def test_sigkill_mid_upload_leaves_a_torn_step_that_the_resume_skips(tmp_path, s3, uninterrupted):
    endpoint, bucket, env = s3
    url = f"s3://{bucket}/job-2/checkpoints"
    spec = long_step_spec(tmp_path, every_steps=1)
    # Step 2's optimizer.pt never gets through: the node dies with model.pt up and no manifest.
    proxy = HoldingProxy(endpoint, hold=rb"PUT /" + bucket.encode() + rb"/job-2/checkpoints/step-00000002/optimizer\.pt")
    try:
        first_node = tmp_path / "node-1"
        process = recipe(spec, first_node, "--checkpoint-dir", url, env={**env, "AWS_ENDPOINT_URL": proxy.endpoint})
        wait_until(lambda: proxy.held.is_set() or process.poll() is not None, timeout=300, every=0.05)
        assert proxy.held.is_set(), process.communicate()[1][-3000:]
        process.kill()
        process.wait(timeout=60)
    finally:
        proxy.close()
    step_two = object_keys(endpoint, bucket, "job-2/checkpoints/step-00000002/")
    assert step_two == ["job-2/checkpoints/step-00000002/model.pt"]  # torn: no optimizer.pt, no manifest
    assert f"job-2/checkpoints/step-00000001/{MANIFEST}" in object_keys(endpoint, bucket, "job-2/")

    second_node = tmp_path / "node-2"
    assert finish(recipe(spec, second_node, "--checkpoint-dir", url, env=env)) == 0
    skipped, = events_of(second_node, "checkpoint_skipped")
    assert skipped["step"] == 2 and skipped["reason"] == "no manifest (upload did not finish)"
    assert skipped["moved_to"] == "deleted (torn upload)"
    start = events_of(second_node, "start")[-1]
    assert start["attempt"] == 2 and start["resumed_from_step"] == 1
    assert_same_adapter_bits(second_node, uninterrupted)
    # The resumed run re-saved steps 2 and 3, whole, and kept two (the last step writes no checkpoint).
    from recipes.object_store import ObjectCheckpoints

    store = ObjectCheckpoints(url, tmp_path / "verify")
    assert store.steps() == store.committed_steps() == [2, 3]


def test_sigterm_to_torchrun_stops_every_rank_at_the_same_micro_batch(tmp_path):
    """Two processes over gloo: torchrun passes SIGTERM on to both ranks, which may see it at
    different micro-batches; their vote makes them drop the same partial step and save together
    (a rank left behind would hang the save's collectives)."""
    spec, run_dir = long_step_spec(tmp_path), tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*torchrun, "-m", "recipes.sft", str(spec), "--run-dir", str(run_dir)], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sigterm_inside_a_step(process, run_dir, after_step=1)
    _, stderr = process.communicate(timeout=600)
    preempted, = events_of(run_dir, "preempted")
    completed = max(e["step"] for e in events_of(run_dir, "step"))
    assert preempted["step"] == completed < STEPS, stderr[-3000:]
    assert [e["step"] for e in events_of(run_dir, "checkpoint")] == [completed]

    from recipes.checkpoint import find_resumable

    path, skipped = find_resumable(run_dir / "checkpoints", REQUIRED_FILES)
    assert skipped == [] and checkpoint_step(path) == completed
    result = subprocess.run([*torchrun, "-m", "recipes.sft", str(spec), "--run-dir", str(run_dir)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert events_of(run_dir, "start")[-1]["resumed_from_step"] == completed
    assert max(e["step"] for e in events_of(run_dir, "step")) == STEPS

    # Each rank's RNG (dropout) came back as it was: the same bits as two ranks never stopped.
    reference = tmp_path / "reference"
    result = subprocess.run([*torchrun, "-m", "recipes.sft", str(spec), "--run-dir", str(reference)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_adapter_bits(run_dir, reference)
