"""Time from SIGTERM to a verified checkpoint, measured on CPU; estimated for an 8B adapter and full 8B.

    python bench/bench_stop.py [--runs 5]      # writes bench/results/stop-cpu.json

Each run starts `python -m recipes.sft` on tiny-llama with a long accumulation step (global 32
blocks, one per micro-batch; dropout on), waits until step 1 is done, then sends SIGTERM at a
random moment inside the next step, as a spot notice or a cancel would. Measured per run:

- signal_to_commit_s: SIGTERM -> the checkpoint's manifest is written (the `checkpoint` event's
  time, which the recipe writes right after the commit);
- signal_to_exit_s: SIGTERM -> the recipe has exited 75 (what SkyPilot's 30 s grace is up against);
- verify_s: this process then checks the checkpoint as a resume would (download + every sha256).

Two stores: a local directory, and S3 through s3fs against moto's server on 127.0.0.1 (the real
S3 API, no network: its figure is the protocol's overhead, not a cloud's bandwidth). Figures are
medians over the runs. The recipe runs with one thread (OMP_NUM_THREADS=1): on a shared CPU two
OpenMP threads per process spin against each other and a micro-batch takes ten times longer,
which would measure the neighbours, not the stop; the load average is recorded with the figures. The 8B estimates are arithmetic from the checkpoint's bytes (counted from
the Llama-3.1-8B shape) over a stated bandwidth, plus the wait for one micro-batch (from the H100
anchors); they are written out with their inputs in the results file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# Llama-3.1-8B (docs/anchors/h100-naive-baseline.json's llama-8b shape).
LLAMA_8B = dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, params=8.03e9)
LORA_R = 16
# Bandwidths the estimate assumes (bytes/s). Local: an NVMe instance disk writing a large file;
# S3: one s3fs stream, which uploads a file's 50 MiB parts one after another.
LOCAL_NVME = 1.5e9
S3_ONE_STREAM = 90e6
EBS_GP3_BASELINE = 125e6
# The longest wait before the stop is seen: one micro-batch, from the H100 anchors (8B LoRA at
# micro-batch 2 x 2048 tokens, 8059 tokens/s; 8B QLoRA at 4 x 2048, 2620 tokens/s).
MICRO_BATCH_S = {"lora": 2 * 2048 / 8059, "qlora": 4 * 2048 / 2620}
GRACE_S = 30  # sky/skylet/subprocess_daemon.py: SIGTERM, 30 s, then SIGKILL


def long_step_spec(directory: Path) -> Path:
    import yaml

    demo = REPO / "recipes" / "configs" / "tiny-demo.yaml"
    spec = yaml.safe_load(demo.read_text())
    spec["data"]["path"] = str((demo.parent / spec["data"]["path"]).resolve())
    spec["batch"] = {"global": 32, "micro": 1}
    spec["train"]["max_steps"] = 50
    spec["lora"]["dropout"] = 0.1
    spec["checkpoint"] = {"every_steps": None, "every_minutes": None, "keep": 2}
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def one_stop(spec: Path, run_dir: Path, checkpoint_dir: str, env: dict, cache: Path) -> dict:
    from contract.events import read_jsonl
    from recipes.checkpoint import REQUIRED_FILES, checkpoint_step, open_checkpoints

    process = subprocess.Popen([sys.executable, "-m", "recipes.sft", str(spec), "--run-dir", str(run_dir),
                                "--checkpoint-dir", checkpoint_dir], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not any(e["event"] == "step" for e in read_jsonl(run_dir / "events.jsonl")):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the recipe did not reach step 1 (exit {process.poll()})")
        time.sleep(0.02)
    time.sleep(random.uniform(0.05, 0.5))
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=600)
    exited = time.time()
    events = read_jsonl(run_dir / "events.jsonl")
    checkpoint = [e for e in events if e["event"] == "checkpoint"][-1]
    preempted = [e for e in events if e["event"] == "preempted"][-1]
    started = time.monotonic()
    path, skipped = open_checkpoints(checkpoint_dir, cache).find_resumable(REQUIRED_FILES)
    verify_s = time.monotonic() - started
    if code != 75 or path is None or skipped or checkpoint_step(path) != preempted["step"]:
        raise SystemExit(f"no verified checkpoint of the last completed step (exit {code}, skipped {skipped})")
    return {"signal_to_commit_s": round(checkpoint["time"] - signalled, 3),
            "signal_to_exit_s": round(exited - signalled, 3), "commit_to_exit_s": round(exited - checkpoint["time"], 3),
            "save_s": checkpoint["seconds"],
            "verify_s": round(verify_s, 3), "bytes": checkpoint["bytes"], "step": preempted["step"],
            "dropped_micro_batches": preempted.get("dropped_micro_batches")}


def summarize(runs: list[dict]) -> dict:
    keys = ("signal_to_commit_s", "signal_to_exit_s", "commit_to_exit_s", "save_s", "verify_s")
    return {"runs": len(runs), **{f"median_{k}": round(statistics.median(r[k] for r in runs), 3) for k in keys},
            "max_signal_to_exit_s": max(r["signal_to_exit_s"] for r in runs), "bytes": runs[0]["bytes"],
            "each": runs}


def estimate_8b() -> dict:
    """Checkpoint bytes from the 8B shape, and seconds = one micro-batch + bytes / bandwidth."""
    s = LLAMA_8B
    head_dim = s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head_dim
    # LoRA on all 7 linear projections: r x (in + out) parameters each.
    shapes = [(s["hidden"], s["hidden"]), (s["hidden"], kv), (s["hidden"], kv), (s["hidden"], s["hidden"]),
              (s["hidden"], s["intermediate"]), (s["hidden"], s["intermediate"]), (s["intermediate"], s["hidden"])]
    adapter_params = s["layers"] * sum(LORA_R * (i + o) for i, o in shapes)
    # peft keeps adapters in fp32 (autocast_adapter_dtype); AdamW keeps two moments of each.
    adapter_bytes = adapter_params * 4 * 3
    # Full: bf16 weights and AdamW moments in the weights' dtype.
    full_bytes = s["params"] * 2 * 3

    def seconds(size: float, bandwidth: float, wait: float) -> float:
        return round(wait + size / bandwidth, 1)

    lora_wait, full_wait = MICRO_BATCH_S["lora"], MICRO_BATCH_S["lora"]
    return {
        "inputs": {"lora_r": LORA_R, "adapter_params": adapter_params, "local_nvme_Bps": LOCAL_NVME,
                   "s3_one_stream_Bps": S3_ONE_STREAM, "ebs_gp3_baseline_Bps": EBS_GP3_BASELINE,
                   "micro_batch_wait_s": {k: round(v, 2) for k, v in MICRO_BATCH_S.items()}, "grace_s": GRACE_S},
        "lora_8b": {
            "bytes": adapter_bytes,
            "arithmetic": f"{adapter_params:,} adapter params x 4 B x 3 (weights + 2 AdamW moments) = "
                          f"{adapter_bytes / 1e6:,.0f} MB",
            "local_nvme_s": seconds(adapter_bytes, LOCAL_NVME, lora_wait),
            "ebs_gp3_s": seconds(adapter_bytes, EBS_GP3_BASELINE, lora_wait),
            "s3_s": seconds(adapter_bytes, S3_ONE_STREAM, lora_wait),
            "qlora_s3_s": seconds(adapter_bytes, S3_ONE_STREAM, MICRO_BATCH_S["qlora"]),
        },
        "full_8b": {
            "bytes": full_bytes,
            "arithmetic": f"{s['params']:.3g} params x 2 B (bf16) x 3 (weights + 2 AdamW moments) = "
                          f"{full_bytes / 1e9:,.1f} GB",
            "local_nvme_s": seconds(full_bytes, LOCAL_NVME, full_wait),
            "ebs_gp3_s": seconds(full_bytes, EBS_GP3_BASELINE, full_wait),
            "s3_s": seconds(full_bytes, S3_ONE_STREAM, full_wait),
        },
        "reading": "An 8B adapter's checkpoint fits SkyPilot's 30 s grace everywhere (about 6 s to S3). Full 8B "
                   "weights do not fit to S3 or EBS at all, and only just to a local NVMe: there the stop "
                   "relies on the notice (AWS gives 2 minutes, GCP and Azure about 30 s) and on the periodic "
                   "checkpoint, whose interval bounds the work lost.",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    import s3fs
    from s3_server import moto_s3, new_bucket, s3_env

    results = {"device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "model": "tiny-llama LoRA, seq 256, global batch 32 = 32 micro-batches of 1 block",
               "recipe_threads": 1, "load_average_before": [round(x, 2) for x in os.getloadavg()], "stores": {}}
    with tempfile.TemporaryDirectory(prefix="bench-stop-") as tmp, moto_s3() as endpoint:
        tmp = Path(tmp)
        spec = long_step_spec(tmp)
        env = {**os.environ, **s3_env(endpoint), "SPOTUNE_CACHE": str(tmp / "model-cache"), "OMP_NUM_THREADS": "1"}
        os.environ.update(s3_env(endpoint))  # this process verifies through the same store
        s3fs.S3FileSystem.clear_instance_cache()
        bucket = new_bucket(endpoint)
        for store in ("local", "s3-moto"):
            runs = []
            for n in range(args.runs):
                run_dir = tmp / f"{store}-{n}"
                where = str(run_dir / "checkpoints") if store == "local" else f"s3://{bucket}/run-{n}/checkpoints"
                runs.append(one_stop(spec, run_dir, where, env, tmp / f"verify-{store}-{n}"))
                print(store, runs[-1], file=sys.stderr)
            results["stores"][store] = summarize(runs)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["estimate_8b"] = estimate_8b()
    out = REPO / "bench" / "results" / "stop-cpu.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: {m: v for m, v in s.items() if m != "each"} for k, s in results["stores"].items()}, indent=1))
    print(json.dumps(results["estimate_8b"], indent=1))


if __name__ == "__main__":
    main()
