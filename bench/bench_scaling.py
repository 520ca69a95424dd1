"""Data-parallel scaling of the real recipe: 1 worker against 2 (on CPU), same spec, same global batch.

    python bench/bench_scaling.py          # 3 interleaved rounds of 1 and 2 workers through torchrun,
                                           # then 2 through Ray Train; about 6 minutes on 2 busy cores
    python bench/bench_scaling.py --spec SPEC --workers 1 2 4 8 --ray skip   # one 8-GPU node
    python bench/bench_scaling.py --compare BASE_RUN_DIR RUN_DIR             # e.g. 1 node against 2

Trains the tiny demo (recipes/configs/tiny-demo.yaml: LoRA on the built-in tiny-llama, the shipped
data, nothing downloaded; or --spec) through the recipe's own entry point: `python -m recipes.sft
SPEC --run-dir DIR` for 1 worker, `python -m torch.distributed.run --standalone --nproc-per-node N
-m recipes.sft ...` for N (gloo on CPU, NCCL on GPUs), and `python -m recipes.ray_train ...
--workers N` for Ray Train. Every run trains the same global batch (N workers: 1/N of each step
each), a fixed number of optimizer steps with no checkpoint inside it. Every worker has
--threads-per-worker threads (default 1): a worker stands for one compute unit, as for one GPU, so
2 workers bring twice the cores. The runs alternate 1, 2, 1, 2, ... so that drift in the machine's
load hits both sides alike.

Figures per run come from the recipe's events.jsonl (rank 0's): step seconds are the gaps between
consecutive `step` events, tokens/s is the `step` event's own tokens_per_second (log_every_steps
1: one step per window), both as medians over the steps after the first --warmup. Start-up is
launch -> the `start` event (interpreter, imports, rendezvous, data, model). Per worker count, the
medians over the rounds; the throughput ratio against the first count (the baseline), and the
scaling efficiency = ratio / (count / baseline).

On CPU this is scaling on a shared 2-core machine: 2 workers compete for the 2 cores with each
other and with whatever else runs there, so the figure says that the distributed path works and
what it costs here, not what GPUs do. The planner's GPU scaling (orchestrator/estimate/
calibration.yaml: throughput.multi_gpu_efficiency and `scaling:`) is ASSUMED until measured on
GPUs (docs/scaling.md says how). Writes bench/results/scaling-cpu.json (scaling-<gpu>.json on GPUs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "configs" / "tiny-demo.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
CAVEAT = ("CPU scaling on a shared {cores}-core machine: 2 workers compete for the same cores with each other and "
          "with everything else running here. GPU scaling in the planner (orchestrator/estimate/calibration.yaml "
          "`scaling:`) is ASSUMED until measured on GPUs.")


def bench_spec(source: Path, directory: Path, steps: int) -> Path:
    """The spec, capped at `steps`, with no checkpoint inside the run (a save would land in the
    measured steps) and micro-batch 'auto' (each worker takes its share of the batch, as fits)."""
    spec = yaml.safe_load(source.read_text())
    if "path" not in spec.get("data", {}):
        raise SystemExit(_bad_input(f"{source}: the bench trains, so the spec needs data.path"))
    spec["data"]["path"] = str((source.resolve().parent / spec["data"]["path"]).resolve())
    spec.pop("execution", None)  # the recipe decides for the world size it runs at
    spec.setdefault("batch", {})["micro"] = "auto"
    spec.setdefault("train", {}).update(max_steps=steps, log_every_steps=1)
    spec["checkpoint"] = {"every_steps": None, "every_minutes": 24 * 60, "keep": 1}
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _bad_input(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def figures(events: list[dict], launched: float, ended: float, warmup: int) -> dict:
    """One run's figures from its events: medians over the steps after `warmup`."""
    start = next(e for e in events if e["event"] == "start")
    steps = [e for e in events if e["event"] == "step"]
    if len(steps) <= warmup + 1:
        raise RuntimeError(f"only {len(steps)} step events, too few past {warmup} warm-up steps")
    times = [start["time"]] + [e["time"] for e in steps]
    step_seconds = [b - a for a, b in zip(times, times[1:])]
    measured = slice(warmup, None)
    return {
        "startup_s": round(start["time"] - launched, 2),
        "first_step_s": round(step_seconds[0], 3),
        "median_step_s": round(statistics.median(step_seconds[measured]), 4),
        "median_tokens_per_second": round(statistics.median(e["tokens_per_second"] for e in steps[measured]), 1),
        "measured_steps": len(step_seconds[measured]),
        "tokens_per_step": round(statistics.mean(
            b["tokens"] - a["tokens"] for a, b in zip(steps, steps[1:])), 1),
        "micro_batch": start.get("micro_batch"), "grad_accum": start.get("grad_accum"),
        "final_loss": next((e["final_loss"] for e in events if e["event"] == "finished"), None),
        "wall_s": round(ended - launched, 2),
    }


def _cpu_seconds() -> float:
    """CPU seconds of every finished child process (torchrun's workers count: torchrun waits for them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(command: list[str], workers: int, run_dir: Path, env: dict, warmup: int, children: bool = True) -> dict:
    cpu, launched = _cpu_seconds(), time.time()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=1800)
    ended, cpu = time.time(), _cpu_seconds() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"{workers}-worker run, exit {done.returncode}: "
                           f"{(done.stderr.strip().splitlines() or ['no output'])[-1][:300]}")
    result = {"workers": workers, **figures(_events(run_dir), launched, ended, warmup)}
    if not children:  # Ray Train's workers are the cluster's processes, not this one's children
        return {**result, "cpu_s": None, "cores_used": None}
    # Cores the run really had, on average over its whole wall time (start-up included): on a
    # shared machine, 2 workers that got about 1 core between them cannot scale.
    return {**result, "cpu_s": round(cpu, 2), "cores_used": round(cpu / (ended - launched), 2)}


def run_torch(workers: int, spec: Path, run_dir: Path, env: dict, warmup: int) -> dict:
    """One run of the recipe: a plain process for 1 worker, torchrun for more."""
    command = [sys.executable, "-m", "recipes.sft"] if workers == 1 else [*TORCHRUN, str(workers), "-m", "recipes.sft"]
    return _run([*command, str(spec), "--run-dir", str(run_dir)], workers, run_dir, env, warmup)


def run_ray(workers: int, spec: Path, run_dir: Path, env: dict, warmup: int) -> dict:
    """One run through Ray Train (recipes/ray_train.py) on the Ray cluster at env's RAY_ADDRESS."""
    gpus = ["--gpus-per-worker", "1"] if env.get("SPOTUNE_BENCH_GPU") else []
    return _run([sys.executable, "-m", "recipes.ray_train", str(spec), "--run-dir", str(run_dir), "--workers",
                 str(workers), "--cpus-per-worker", "1", *gpus], workers, run_dir, env, warmup, children=False)


def measure_ray(args, spec: Path, workdir: Path, env: dict) -> dict:
    """Ray Train on a cluster that is up before the first run, as a real one is: on CPU, one Ray
    node per worker, each capped to 1 CPU (tests/ray_cluster.py), so 2 workers train across 2 Ray
    nodes over gloo; on a GPU node, a Ray instance of the driver's own ('local', never a cluster
    someone else started here)."""
    if env.get("SPOTUNE_BENCH_GPU"):
        return measure("ray-train", run_ray, args.workers, args.ray_repeats, spec, workdir,
                       {**env, "RAY_ADDRESS": "local"}, args.warmup)
    sys.path.insert(0, str(REPO / "tests"))
    from ray_cluster import RayCluster

    started = time.time()
    cluster = RayCluster().start(worker_nodes=max(args.workers) - 1)
    up = round(time.time() - started, 1)
    print(f"  a Ray cluster of {max(args.workers)} one-CPU nodes came up in {up} s (not in the runs' start-up)",
          flush=True)
    try:
        ray_env = {**env, "RAY_ADDRESS": cluster.gcs_address, "RAY_AUTH_MODE": "disabled"}
        return {"cluster": f"{max(args.workers)} Ray nodes of 1 CPU on loopback", "cluster_start_s": up,
                **measure("ray-train", run_ray, args.workers, args.ray_repeats, spec, workdir, ray_env, args.warmup)}
    finally:
        cluster.stop()


def summarize(runs: list[dict], counts: list[int]) -> dict:
    """Medians over the repeats of each worker count, and each count's throughput against the
    first count's (the baseline) with the efficiency: ratio / (count / baseline count)."""
    base = counts[0]
    side = {n: [r for r in runs if r["workers"] == n] for n in counts}
    median = {n: {k: (round(statistics.median(r[k] for r in rs), 6) if all(r[k] is not None for r in rs) else None)
                  for k in ("median_tokens_per_second", "median_step_s", "startup_s", "wall_s", "cores_used",
                            "final_loss")}
              for n, rs in side.items()}
    ratio = {n: median[n]["median_tokens_per_second"] / median[base]["median_tokens_per_second"] for n in counts[1:]}
    # Each run against the baseline run of the same round: their spread is the machine's noise.
    pairs = {n: [round(b["median_tokens_per_second"] / a["median_tokens_per_second"], 3)
                 for a, b in zip(side[base], side[n])] for n in counts[1:]}
    return {"baseline_workers": base, "by_workers": {str(n): m for n, m in median.items()},
            "throughput_ratio": {str(n): round(r, 3) for n, r in ratio.items()},
            "scaling_efficiency": {str(n): round(r * base / n, 3) for n, r in ratio.items()},
            "per_round_ratios": {str(n): v for n, v in pairs.items()}}


def report(name: str, summary: dict) -> None:
    for n, m in summary["by_workers"].items():
        print(f"{name} {n} worker{'s' if n != '1' else ' '}: {m['median_tokens_per_second']:>9,.0f} tok/s  "
              f"step {m['median_step_s']:.3f} s  start-up {m['startup_s']:.1f} s  wall {m['wall_s']:.1f} s  "
              + (f"cores used {m['cores_used']:.2f}" if m["cores_used"] is not None else ""), flush=True)
    base = summary["baseline_workers"]
    for n, ratio in summary["throughput_ratio"].items():
        rounds = ", ".join(f"{p:.2f}" for p in summary["per_round_ratios"][n])
        print(f"{name} {n}/{base} throughput ratio {ratio:.2f}, scaling efficiency "
              f"{summary['scaling_efficiency'][n]:.0%} (per round: {rounds})", flush=True)


def measure(name: str, runner, counts: list[int], repeats: int, spec: Path, workdir: Path, env: dict,
            warmup: int) -> dict:
    runs = []
    for i in range(repeats):
        for workers in counts:
            run_dir = workdir / f"{name}-{workers}w-{i}"
            shutil.rmtree(run_dir, ignore_errors=True)
            load = round(os.getloadavg()[0], 2)
            r = {**runner(workers, spec, run_dir, env, warmup), "load_average_1min_before": load}
            runs.append(r)
            print(f"  {name} round {i + 1}/{repeats}, {workers} worker(s): {r['median_tokens_per_second']:,.0f} tok/s, "
                  f"step {r['median_step_s']:.3f} s, start-up {r['startup_s']:.1f} s, "
                  + (f"cores used {r['cores_used']:.2f}, " if r["cores_used"] is not None else "")
                  + f"load {load}", flush=True)
    summary = summarize(runs, counts)
    report(name, summary)
    return {"runs": runs, **summary}


def compare(base_dir: Path, other_dir: Path, warmup: int) -> int:
    """Two runs made elsewhere (1 node and 2 nodes, say): their step rates, and the efficiency when
    their start events give the world sizes (GPU runs record gpu_count = the world size)."""
    rows = []
    for run_dir in (base_dir, other_dir):
        events = _events(run_dir)
        if not any(e["event"] == "start" for e in events):
            return _bad_input(f"{run_dir}/events.jsonl has no start event (the recipe's run directory, rank 0's)")
        start = next(e for e in events if e["event"] == "start")
        try:
            measured = figures(events, start["time"], events[-1]["time"], warmup)
        except RuntimeError as e:
            return _bad_input(f"{run_dir}: {e}")
        rows.append({"run_dir": str(run_dir), "world_size": start.get("gpu_count") or None, **measured})
    for r in rows:
        print(f"{r['run_dir']}: {r['median_tokens_per_second']:,.0f} tok/s, step {r['median_step_s']:.3f} s, "
              f"world size {r['world_size'] or 'unknown (CPU run)'}")
    ratio = rows[1]["median_tokens_per_second"] / rows[0]["median_tokens_per_second"]
    line = f"throughput ratio {ratio:.3f}"
    if rows[0]["world_size"] and rows[1]["world_size"]:
        line += f", scaling efficiency {ratio * rows[0]['world_size'] / rows[1]['world_size']:.3f}"
    print(line)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", type=Path, default=DEMO, help="the job spec to train (default: the tiny demo)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="worker counts, the first the baseline (default: 1 2; on an 8-GPU node: 1 2 4 8)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds over the worker counts (default 3)")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per run (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians (default 5)")
    p.add_argument("--threads-per-worker", type=int, default=1, help="OMP_NUM_THREADS of every worker (default 1)")
    p.add_argument("--ray-repeats", type=int, default=2,
                   help="interleaved rounds through Ray Train (default 2)")
    p.add_argument("--ray", choices=["auto", "skip"], default="auto",
                   help="auto: also measure Ray Train when recipes/ray_train.py exists")
    p.add_argument("--out", type=Path, default=None,
                   help="default: bench/results/scaling-cpu.json, or scaling-<gpu>.json on a GPU")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("BASE_RUN_DIR", "RUN_DIR"),
                   help="train nothing: compare two finished runs' step rates (e.g. 1 node against 2)")
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare, args.warmup)
    if len(set(args.workers)) != len(args.workers) or min(args.workers) < 1 or len(args.workers) < 2:
        p.error("--workers takes two or more different counts of at least 1, the baseline first")
    if args.steps <= args.warmup + 1:
        p.error("--steps must be more than --warmup + 1")
    import torch

    gpu = torch.cuda.is_available()
    if gpu and max(args.workers) > torch.cuda.device_count():
        p.error(f"--workers {max(args.workers)} needs as many GPUs; this node has {torch.cuda.device_count()}")
    cores = os.cpu_count()
    device = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if gpu
              else f"CPU ({platform.machine()}, {cores} cores)")
    caveat = CAVEAT.format(cores=cores) if not gpu else (
        "GPU scaling within one node. The planner's inter-node efficiency (calibration.yaml `scaling:`) "
        "stays ASSUMED until a multi-node run is measured (docs/scaling.md).")
    slug = "cpu" if not gpu else "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(0).lower())
    out = args.out or REPO / "bench" / "results" / f"scaling-{slug.strip('-')}.json"
    counts = " vs ".join(map(str, args.workers))
    try:
        spec_name = str(args.spec.resolve().relative_to(REPO))
    except ValueError:
        spec_name = str(args.spec)
    result = {
        "what": f"data-parallel scaling of the recipe, {counts} workers, same spec and global batch",
        "caveat": caveat,
        "spec": f"{spec_name}, batch.micro auto, train.max_steps {args.steps}, no checkpoints",
        "commands": {"1": "python -m recipes.sft SPEC --run-dir DIR",
                     "N": "python -m torch.distributed.run --standalone --nproc-per-node N -m recipes.sft SPEC "
                          "--run-dir DIR",
                     "ray": "python -m recipes.ray_train SPEC --run-dir DIR --workers N --cpus-per-worker 1"},
        "repeats": args.repeats, "ray_repeats": args.ray_repeats, "steps": args.steps, "warmup_steps": args.warmup,
        "threads_per_worker": args.threads_per_worker,
        "device": device, "torch": torch.__version__,
        "python": platform.python_version(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # Context for CPU figures on a shared machine: other work competes for the cores.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    print(caveat, flush=True)
    with tempfile.TemporaryDirectory(prefix="spotune-scaling-") as tmp:
        tmp = Path(tmp)
        # One worker is one compute unit, as one GPU is: a fixed number of threads per worker, so 2
        # workers bring twice the cores. Several threads per process on a shared machine also
        # stall at every parallel region whenever another process holds one of the cores.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
               "OMP_NUM_THREADS": str(args.threads_per_worker), **({"SPOTUNE_BENCH_GPU": "1"} if gpu else {})}
        spec = bench_spec(args.spec, tmp, args.steps)
        try:
            result["torchrun"] = measure("torchrun", run_torch, args.workers, args.repeats, spec, tmp, env, args.warmup)
        except RuntimeError as e:
            print(f"error: the recipe failed: {e}", file=sys.stderr)
            return 1
        if args.ray == "skip":
            result["ray_train"] = {"skipped": "--ray skip"}
        elif not (REPO / "recipes" / "ray_train.py").exists():
            result["ray_train"] = {"skipped": "recipes/ray_train.py does not exist"}
        else:
            try:
                result["ray_train"] = measure_ray(args, spec, tmp, env)
            except (RuntimeError, subprocess.TimeoutExpired, StopIteration) as e:
                result["ray_train"] = {"skipped": f"the Ray Train run failed: {e}"}
        if "skipped" in result["ray_train"]:
            print(f"Ray Train: skipped ({result['ray_train']['skipped']})", flush=True)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(caveat, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(REPO) if out.resolve().is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
