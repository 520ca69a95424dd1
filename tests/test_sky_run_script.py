"""The run script as SkyPilot really runs it: wrapped by SkyPilot's own TaskCodeGen.build_task_bash_script
(which appends the MOUNT_CACHED flush) and log_lib.make_task_bash_script, executed with `bash -i`.

Only what cannot exist here is a stub on PATH: `python -m recipes.sft` (a tiny recipe that writes
the events of the outcome asked for), the spot-notice watcher, and `findmnt` plus a quiet rclone
log, so SkyPilot's flush believes a cached mount is there and runs to its "upload complete" line.
The node helper (`python -m launch.sky_node`) is the real one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml

from launch.event_log import EVENT_LOG_PREFIX
from launch.sky_scripts import run_commands
from launch.sky_store import JobStore

REPO = Path(__file__).resolve().parents[1]
FLUSHED = "skypilot: cached mount upload complete"
JOB = "demo-20261129-ab12"

FAKE_RECIPE = r'''
import os, signal, sys, time
from pathlib import Path
from contract.events import EventLog

args = sys.argv[1:]
run_dir = Path(args[args.index("--run-dir") + 1])
outcome = os.environ["FAKE_OUTCOME"]
log = EventLog(run_dir / "events.jsonl", attempt=int(os.environ.get("FAKE_ATTEMPT", "1")))
if outcome == "bad_input":
    log.emit("error", message="unknown model", kind="bad_input")
    print("error: unknown model", file=sys.stderr)
    sys.exit(2)
log.emit("start", resumed_from_step=None)
log.emit("step", step=1, tokens=100, loss=2.0, lr=1e-4, tokens_per_second=10.0)
if outcome == "finished":
    (run_dir / "output").mkdir(parents=True, exist_ok=True)
    (run_dir / "output" / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    log.emit("finished", step=1, tokens=100, final_loss=2.0, train_seconds=1.0,
             output_path=os.environ.get("SPOTUNE_OUTPUT_URL", str(run_dir / "output")))
    sys.exit(0)
if outcome in ("preempted", "preempted_under_torchrun"):
    log.emit("preempted", step=1, signal="SIGTERM")
    sys.exit(75 if outcome == "preempted" else 1)  # torchrun reports a worker's 75 as 1
if outcome == "crash":
    log.emit("error", message="CUDA error: an illegal memory access", kind="crash")
    sys.exit(1)
if outcome == "wait_for_sigterm":
    def stop(signum, frame):
        time.sleep(0.5)  # a checkpoint takes a moment: the shell must wait for it
        log.emit("preempted", step=1, signal="SIGTERM")
        sys.exit(75)
    signal.signal(signal.SIGTERM, stop)
    Path(os.environ["FAKE_READY"]).write_text(str(os.getpid()))
    for _ in range(600):
        time.sleep(0.1)
    sys.exit(1)
'''

STUB_PYTHON = r'''#!/bin/bash
case "$1 $2" in
  "-m recipes.sft") shift 2; exec "$REAL_PYTHON" "$FAKE_RECIPE" "$@" ;;
  "-m torch.distributed.run")  # record torchrun's flags, then run the fake recipe as its only worker
    shift 2; printf "%s\n" "$@" > "$TORCHRUN_ARGS"
    while [ "$1" != "recipes.sft" ]; do shift; done; shift; exec "$REAL_PYTHON" "$FAKE_RECIPE" "$@" ;;
  "-m recipes.spot_notice") exec "$REAL_PYTHON" -c "import time; time.sleep(120)" ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
'''


@pytest.fixture
def node(tmp_path):
    """A node's home: stubs on PATH, SkyPilot's rclone log saying the cache is uploaded."""
    home = tmp_path / "home"
    (home / "sky_workdir").mkdir(parents=True)
    rclone_log = home / ".sky" / "rclone_log"
    rclone_log.mkdir(parents=True)
    (rclone_log / "ckpt.log").write_text("INFO  : vfs cache: cleaned: objects 3 (was 3) in use 0, to upload 0, "
                                         "uploading 0, total size 1.2Mi (was 1.2Mi)\n")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("python", STUB_PYTHON), ("findmnt", "#!/bin/bash\necho '/ckpt remote fuse.rclone rw'\n"),
                       ("sleep", "#!/bin/bash\nexit 0\n")):  # the flush's own sleeps, not the recipe's
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    (tmp_path / "fake_recipe.py").write_text(FAKE_RECIPE)
    return tmp_path


def run_on_node(node: Path, outcome: str, *, mounted: bool = True, max_restarts: int = 3, wait=None,
                sky_env: Optional[dict] = None):
    """SkyPilot's wrapping of our run, as the skylet runs it; returns (exit status, output)."""
    from sky.backends.task_codegen import TaskCodeGen
    from sky.skylet import log_lib

    store = JobStore(f"file://{node}/store/{JOB}" if not mounted else f"s3://spotune-ckpt-x/{JOB}", mounted)
    run = run_commands(store).replace('RUN_DIR="/ckpt/', f'RUN_DIR="{node}/ckpt/')  # the mount point, here
    envs = {"SPOTUNE_JOB_ID": JOB, "SPOTUNE_STORE": store.url, "SPOTUNE_OUTPUT_URL": store.output_url,
            "SPOTUNE_MAX_RESTARTS_ON_ERRORS": str(max_restarts), "SPOTUNE_SPEC_YAML": yaml.safe_dump({"name": "demo"}),
            **(sky_env or {})}
    script = node / "sky_app_script.sh"
    script.write_text(log_lib.make_task_bash_script(TaskCodeGen.build_task_bash_script(run), env_vars=envs))
    env = {"HOME": str(node / "home"), "PATH": f"{node / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "REAL_PYTHON": sys.executable, "FAKE_RECIPE": str(node / "fake_recipe.py"), "FAKE_OUTCOME": outcome,
           "FAKE_READY": str(node / "ready"), "TORCHRUN_ARGS": str(node / "torchrun-args"), "LANG": "C.UTF-8"}
    proc = subprocess.Popen(["/bin/bash", "-i", str(script)], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait is not None:
        wait(proc)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def run_dir(node: Path, mounted: bool = True) -> Path:
    return node / "ckpt" / JOB if mounted else node / "home" / "spotune-run" / JOB


@pytest.mark.parametrize("outcome, status", [
    ("finished", 0), ("preempted", 75), ("preempted_under_torchrun", 75), ("crash", 76), ("bad_input", 2)])
def test_skypilots_flush_runs_after_our_run_and_the_job_ends_with_the_right_status(node, outcome, status):
    code, out = run_on_node(node, outcome)
    assert FLUSHED in out, out
    assert code == status, out
    # The events reach the job log, prefixed, for the backend to read.
    mirrored = [json.loads(line.split(EVENT_LOG_PREFIX, 1)[1]) for line in out.splitlines() if EVENT_LOG_PREFIX in line]
    assert mirrored and mirrored[-1]["event"] in ("finished", "preempted", "error")


def test_crashes_are_retried_on_a_new_node_until_the_specs_restart_budget_is_spent(node):
    """Each crash SkyPilot should retry exits 76; the count lives in the durable store (under the
    bucket mount), so the node of the next attempt knows it; past the budget the crash is final."""
    assert [run_on_node(node, "crash", max_restarts=2)[0] for _ in range(3)] == [76, 76, 1]
    assert (run_dir(node) / "crash-restarts").read_text() == "2"


def test_a_preemption_before_the_crash_budget_is_not_counted_against_it(node):
    assert run_on_node(node, "preempted", max_restarts=1)[0] == 75
    assert not (run_dir(node) / "crash-restarts").exists()
    assert run_on_node(node, "crash", max_restarts=1)[0] == 76


def test_sigterm_from_a_cancel_waits_for_the_recipes_checkpoint_and_still_flushes(node):
    def cancel_once_running(proc):
        ready = node / "ready"
        for _ in range(600):  # the recipe starts within seconds; bounded
            if ready.exists() and ready.read_text():
                break
            time.sleep(0.05)
        else:
            pytest.fail("the fake recipe never started")
        # SkyPilot's cancel SIGTERMs every process of the job (sky/skylet/subprocess_daemon.py).
        for pid in (proc.pid, int(ready.read_text())):
            os.kill(pid, signal.SIGTERM)

    code, out = run_on_node(node, "wait_for_sigterm", wait=cancel_once_running)
    assert code == 75, out
    assert FLUSHED in out
    events = [json.loads(line) for line in (run_dir(node) / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "preempted"


def test_a_direct_store_gets_the_output_with_its_manifest_last(node):
    code, out = run_on_node(node, "finished", mounted=False)
    assert code == 0, out
    store = node / "store" / JOB
    manifest = json.loads((store / "output" / "spotune-output.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["adapter_model.safetensors"]
    assert (store / "output" / "adapter_model.safetensors").read_bytes() == b"weights" * 100


def test_a_direct_store_that_cannot_be_written_ends_the_run_before_the_recipe_starts(node):
    """Not even the crash count can be written there, so the crash is final (1), not retried blindly;
    refused credentials are bad input (2): tests/test_sky_node.py."""
    (node / "store").write_text("a file where the store's folder should be")
    code, out = run_on_node(node, "finished", mounted=False)
    assert code == 1, out
    assert "error: checkpoint store file://" in out and FLUSHED in out
    assert not (run_dir(node, mounted=False) / "events.jsonl").exists()


def of_node(rank: int, gpus: int = 8) -> dict:
    """What SkyPilot's add_task sets on node `rank` of a 3-node task (sky/backends/task_codegen.py)."""
    return {"SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.7\n10.0.0.6", "SKYPILOT_NODE_RANK": str(rank),
            "SKYPILOT_NUM_NODES": "3", "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus)}


@pytest.mark.parametrize("gpus, nproc", [(8, "8"), (0, "1")])  # a CPU node runs one process
def test_each_node_runs_torchrun_with_the_static_rendezvous_at_the_head(node, gpus, nproc):
    code, out = run_on_node(node, "finished", sky_env=of_node(2, gpus))
    assert code == 0, out
    args = (node / "torchrun-args").read_text().split("\n")
    flags = dict(zip(args[:10:2], args[1:10:2]))
    assert flags == {"--nnodes": "3", "--node-rank": "2", "--nproc-per-node": nproc, "--master-addr": "10.0.0.5",
                     "--master-port": "29500"}
    assert args[10:12] == ["-m", "recipes.sft"]


@pytest.mark.parametrize("outcome", ["finished", "crash", "bad_input", "preempted_under_torchrun"])
def test_a_worker_node_leaves_the_jobs_status_to_the_head_and_reports_nothing(node, outcome):
    """SkyPilot ends the job when any node exits non-zero and recovers it when any code is in
    recover_on_exit_codes: a worker, whose ranks write no events, must never decide. It mirrors
    no events, counts no crash and publishes nothing."""
    code, out = run_on_node(node, outcome, mounted=False, sky_env=of_node(1))
    assert code == 0, out
    assert FLUSHED in out  # SkyPilot's flush still runs after our run
    assert EVENT_LOG_PREFIX not in out
    assert "spotune: node 1: the recipe exited" in out
    assert not (node / "store" / JOB / "crash-restarts").exists()
    assert not (node / "store" / JOB / "output").exists()


@pytest.mark.parametrize("outcome, status", [("finished", 0), ("crash", 76), ("bad_input", 2),
                                             ("preempted_under_torchrun", 75)])
def test_the_head_of_several_nodes_speaks_for_the_job(node, outcome, status):
    code, out = run_on_node(node, outcome, sky_env=of_node(0))
    assert code == status, out
    assert FLUSHED in out
    mirrored = [json.loads(line.split(EVENT_LOG_PREFIX, 1)[1]) for line in out.splitlines() if EVENT_LOG_PREFIX in line]
    assert mirrored and mirrored[-1]["event"] in ("finished", "preempted", "error")
