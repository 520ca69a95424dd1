"""The recipe under Ray Train: one TorchTrainer worker per GPU (or per CPU slot), on any Ray cluster.

    python -m recipes.ray_train SPEC.yaml --run-dir SHARED/JOB --workers N [--gpus-per-worker 1]
                                [--cpus-per-worker C] [--max-failures F] [--merge]

Run as the driver of a Ray job (launch/ray.py submits it): it starts a TorchTrainer whose workers
each run `recipes.sft` unchanged. Ray Train starts torch.distributed (gloo on CPU, NCCL on GPU) and
sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE, which the recipe reads as it does under
torchrun.

RUN_DIR must be a directory every node sees at the same path (NFS, a bucket mount; one node's disk
for a one-node cluster): it is Ray Train's run directory too (RunConfig storage_path = its parent,
name = its last part, so a resubmission of the job resumes), and it holds what the recipe writes
(events.jsonl, checkpoints/, output/) and the job's input (input/: the spec and its data file,
copied there by the driver, since Ray Train starts each worker in a directory of its own).

Checkpoints stay the recipe's own (checkpoints/step-N, verified by manifest): rank 0 saves one,
then every rank reports it through `ray.train.report(checkpoint=...)` without an upload, so Ray's
latest checkpoint and the recipe's are the same directory. A lost worker fails the group; Ray
Train starts a new one (up to --max-failures times) and the recipe resumes from the newest
complete checkpoint, exactly as after a preemption. Each group start is an attempt: rank 0 counts
them in RUN_DIR/ray-train-starts.jsonl and every event it writes carries that number, and Ray
Train's controller writes an `error` event for a group that died without saying why.

A stop (Ray's stop_job, a drain) signals the driver only; Ray Train's workers run the recipe in a
thread no signal reaches. The driver writes RUN_DIR/stop-requested, which every worker polls as the
recipe polls for SIGTERM: the last completed step is saved and the group ends with exit 75.

Exit codes: the recipe's (0 finished, 75 stopped, 2 bad input, 74/80/81 final stops), 1 when Ray
Train gave up.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from contract.errors import UserError
from contract.events import (ERROR, EVENTS_FILE, EXIT_BAD_INPUT, EXIT_CRASH, FINISHED, PREEMPTED, EventLog,
                             read_jsonl)
from contract.spec import load_spec

STARTS_FILE = "ray-train-starts.jsonl"
STOP_FILE = "stop-requested"  # the driver's SIGTERM, passed on to the workers (no signal reaches them)
STOP_POLL_SECONDS = 1.0
INPUT_DIR = "input"
# What every worker must import to run the recipe: checked on each node before training starts.
RECIPE_DEPENDENCIES = ("torch", "transformers", "peft")
LOST = "worker_lost"  # the `error` event's kind for a worker group Ray Train lost


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipes.ray_train", description=__doc__.splitlines()[0])
    p.add_argument("spec", type=Path)
    p.add_argument("--run-dir", type=Path, required=True, help="shared by every node: Ray Train's run directory")
    p.add_argument("--workers", type=int, default=1, help="training processes (the world size)")
    p.add_argument("--gpus-per-worker", type=int, default=0, help="0: train on CPU over gloo")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts Ray Train may make")
    p.add_argument("--merge", action="store_true")
    args = p.parse_args(argv)
    if args.workers < 1 or args.gpus_per_worker < 0 or args.max_failures < 0:
        p.error("--workers must be at least 1, --gpus-per-worker and --max-failures at least 0")
    return args


# --- on each worker ---------------------------------------------------------------------------

def count_start(run_dir: Path) -> int:
    """Record one worker-group start; the attempt number is how many there have been."""
    path = run_dir / STARTS_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": round(time.time(), 3), "pid": os.getpid()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return len(read_jsonl(path))


def starts(run_dir: Path) -> int:
    return len(read_jsonl(Path(run_dir) / STARTS_FILE))


def train_worker(config: dict) -> int:
    """One Ray Train worker: the recipe, with its checkpoints reported to Ray."""
    import ray.train
    import torch.distributed as dist
    from ray.train import CheckpointUploadMode

    run_dir = Path(config["run_dir"])
    rank = ray.train.get_context().get_world_rank()
    box = [count_start(run_dir) if rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    attempt = box[0]
    latest = ray.train.get_checkpoint()
    if rank == 0 and latest is not None:
        # The recipe resumes from the newest complete checkpoint in run_dir/checkpoints: this one,
        # or a newer one whose report a failure cut short.
        print(f"Ray Train's latest checkpoint: {latest.path}", flush=True)

    def report(step: int, path: Optional[Path]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    from recipes import sft

    code = sft.main([*config["argv"], "--attempt", str(attempt)], on_checkpoint=report,
                    stop_requested=_stop_file_reader(run_dir / STOP_FILE))
    if code == EXIT_CRASH:
        # A crash is what Ray Train restarts (its failure budget), from the last checkpoint.
        raise RuntimeError(f"the recipe crashed on rank {rank} (exit {code}); see the worker's log")
    return code  # finished, or a stop no restart would change (bad input, disk full, budget, diverged)


def _stop_file_reader(path: Path):
    """A poll for the driver's stop file, looked at once a second at most (it may be on NFS)."""
    last = [0.0]

    def stop_requested() -> Optional[str]:
        now = time.monotonic()
        if now - last[0] < STOP_POLL_SECONDS:
            return None
        last[0] = now
        try:
            return path.read_text().strip() or "SIGTERM"
        except FileNotFoundError:
            return None

    return stop_requested


def _pass_stops_on(run_dir: Path) -> None:
    """SIGTERM/SIGINT to the driver (Ray's stop_job, a drain) become the stop file every worker
    polls: the recipe saves its last completed step and the group ends with exit 75."""
    import signal

    def handle(signum, _frame):
        (run_dir / STOP_FILE).write_text(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


def _recorder_class():
    from ray.train import UserCallback

    class RecordLostGroups(UserCallback):
        """On Ray Train's controller: a worker group that failed without the recipe saying so (a
        killed worker, a lost node) gets an `error` event under its attempt number."""

        def __init__(self, run_dir: str):
            self.run_dir = run_dir

        def after_exception(self, run_context, worker_exceptions):
            run_dir = Path(self.run_dir)
            attempt = starts(run_dir)
            if attempt == 0:
                return
            said = [e for e in read_jsonl(run_dir / EVENTS_FILE) if e.get("attempt") == attempt]
            # A surviving rank may have reported its own crash first (gloo: "connection closed by
            # peer"): the controller knows which worker was lost, and says so too.
            if any(e.get("event") in (FINISHED, PREEMPTED) or e.get("kind") == LOST for e in said):
                return
            rank, error = sorted(worker_exceptions.items())[0]
            message = f"Ray Train lost the worker group (rank {rank}: {_first_line(error)})"
            EventLog(run_dir / EVENTS_FILE, attempt=attempt).emit(ERROR, message=message[:2000], kind=LOST)

    return RecordLostGroups


# --- the driver -------------------------------------------------------------------------------

def stage_input(spec_path: Path, run_dir: Path) -> Path:
    """The spec and its data file under run_dir/input, where every worker can read them."""
    spec = load_spec(spec_path, for_training=True)  # a bad spec fails here, before any worker starts
    target = run_dir / INPUT_DIR
    tmp = run_dir / f".{INPUT_DIR}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    data = Path(spec.data.path)
    if not data.is_absolute():
        data = spec_path.parent / data
    (tmp / "data").mkdir()
    shutil.copy2(data, tmp / "data" / data.name)
    import yaml

    node = yaml.safe_load(spec_path.read_text())
    node["data"]["path"] = f"data/{data.name}"
    (tmp / "spec.yaml").write_text(yaml.safe_dump(node, sort_keys=False))
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    return target / "spec.yaml"


def check_dependencies(ray, names: tuple[str, ...] = RECIPE_DEPENDENCIES) -> Optional[str]:
    """One line naming what the recipe cannot import on which node, or None when every node can."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def missing(names: tuple[str, ...]) -> list[str]:
        import importlib.util

        # Found, not imported: importing torch on every node would cost each job seconds of CPU.
        return [name for name in names if importlib.util.find_spec(name) is None]

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    checks = {n["NodeManagerAddress"]: missing.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(names) for n in nodes}
    problems = [f"{', '.join(found)} on {ip}" for ip, ref in checks.items() if (found := ray.get(ref))]
    if not problems:
        return None
    return ("the Ray cluster lacks the recipe's dependencies (" + "; ".join(problems) +
            "): install spotune's train extra in the cluster's Python (pip install 'spotune[train]')")


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = args.run_dir.resolve()
    try:
        spec_path = stage_input(args.spec.resolve(), run_dir)
        (run_dir / STOP_FILE).unlink(missing_ok=True)  # an earlier run's stop: this one resumes
    except (UserError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as e:
        print(f"error: Ray Train cannot be imported here ({_first_line(e)}): pip install 'ray[train]'", file=sys.stderr)
        return EXIT_BAD_INPUT
    ray.init(log_to_driver=True)
    _pass_stops_on(run_dir)  # after ray.init, whose own SIGTERM handler would end the driver at once
    problem = check_dependencies(ray)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    use_gpu = args.gpus_per_worker > 0
    resources = {"CPU": args.cpus_per_worker, **({"GPU": args.gpus_per_worker} if use_gpu else {})}
    recipe_argv = [str(spec_path), "--run-dir", str(run_dir), "--checkpoint-dir", str(run_dir / "checkpoints"),
                   *(["--merge"] if args.merge else [])]
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"argv": recipe_argv, "run_dir": str(run_dir)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(storage_path=str(run_dir.parent), name=run_dir.name,
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             callbacks=[_recorder_class()(str(run_dir))]))
    print(f"Ray Train: {args.workers} workers x {resources}, run dir {run_dir}", flush=True)
    try:
        result = trainer.fit()
    except Exception as e:
        print(f"error: Ray Train gave up after {starts(run_dir)} worker-group starts: {_first_line(e)}",
              file=sys.stderr)
        return EXIT_CRASH
    return int(result.return_value or 0)


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
