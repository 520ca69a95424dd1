"""The local backend's start-up: billed seconds that are not training steps.

Launches the tiny demo (recipes/configs/tiny-demo.yaml, capped at a few steps) through the real
local backend N times and, from each job's ledger attempt and events, takes

    start-up = billed wall seconds - trained tokens / median step tokens/s

i.e. process start, imports, reading the data, building or loading the model, the first step's
warm-up beyond the steady rate, and the final save and exit: what the plan's training line does
not cover. The first run builds tiny-llama into a fresh cache; the rest load it. Prints the
median and writes bench/results/startup-cpu.json, the source of calibration.yaml's
overheads.local_startup.seconds.

Usage: python bench/bench_startup.py [--runs 5] [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.ledger import Ledger  # noqa: E402

DEMO = ROOT / "recipes" / "configs" / "tiny-demo.yaml"


def demo_spec(directory: Path, steps: int) -> Path:
    spec = yaml.safe_load(DEMO.read_text())
    spec["data"]["path"] = str((DEMO.parent / spec["data"]["path"]).resolve())
    spec["train"]["max_steps"] = steps
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def one_run(spec: Path, state: Path, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "orchestrator", "--state-dir", str(state), "launch", str(spec)],
                          env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"the demo launch failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    ledger = Ledger(f"sqlite:///{state / 'ledger.db'}")
    job = ledger.list_jobs()[0]
    attempt = ledger.attempts(job.id)[0]
    rates = [s.tokens_per_second for s in ledger.samples(job.id) if s.tokens_per_second]
    tokens = max(s.tokens for s in ledger.samples(job.id))
    wall = (attempt.ended_at - attempt.started_at).total_seconds()
    training = tokens / statistics.median(rates)
    return {"wall_s": round(wall, 2), "tokens": tokens, "median_tokens_per_second": round(statistics.median(rates), 1),
            "training_s": round(training, 2), "startup_s": round(wall - training, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "startup-cpu.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="spotune-startup-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "SPOTUNE_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"}
        spec = demo_spec(tmp, args.steps)
        runs = [one_run(spec, tmp / f"state-{i}", env) for i in range(args.runs)]
    startup = [r["startup_s"] for r in runs]
    result = {
        "what": "local backend start-up: billed wall seconds - trained tokens / median step tokens/s, tiny demo",
        "spec": "recipes/configs/tiny-demo.yaml with train.max_steps " + str(args.steps),
        "runs": runs,
        "first_run_builds_the_model": True,
        "median_startup_s": statistics.median(startup),
        "min_startup_s": min(startup),
        "max_startup_s": max(startup),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "measured_on": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"local start-up over {args.runs} runs: median {result['median_startup_s']:.1f} s "
          f"(min {result['min_startup_s']:.1f}, max {result['max_startup_s']:.1f}); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
