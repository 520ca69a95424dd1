"""What asking SkyPilot "can this launch?" adds to `spotune launch --backend skypilot` and `spotune plan --backend skypilot`.

Plans the Llama-3.1-8B QLoRA job over the bundled snapshot plus the SkyPilot catalog excerpts of
tests/fixtures (seeded as SkyPilot's catalog, offline), with AWS, GCP, Lambda, RunPod, Vast, Verda
and Nebius enabled as `sky check` would record them, then times launch/sky_feasibility.feasible on
the plan's kept options (the usual case) and on every ranked candidate (the worst case: the first
ranks are all refused and the whole ranking is searched), each in a fresh process so SkyPilot's
catalogs are read cold, as a CLI call reads them. Prints the medians and writes
bench/results/sky-feasibility.json.

Usage: python bench/bench_sky_feasibility.py [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_ONE_RUN = r"""
import json, os, sys, time
sys.path.insert(0, "tests")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SKYPILOT_DISABLE_LOCAL_API_SERVER", "1")
from sky_catalog import seeded_runtime, sky_with_seeded_catalog
sky = sky_with_seeded_catalog()
os.environ["SKY_RUNTIME_DIR"] = seeded_runtime()
from sky import global_user_state, skypilot_config
from sky.clouds.cloud import CloudCapability
workspace = skypilot_config.get_active_workspace()
global_user_state.set_enabled_clouds(["AWS", "GCP", "Lambda", "RunPod", "Vast", "Verda", "Nebius"], CloudCapability.COMPUTE, workspace)
global_user_state.set_enabled_clouds(["AWS", "GCP"], CloudCapability.STORAGE, workspace)
from contract.spec import parse_spec
from orchestrator.catalog import load_offers
from orchestrator.planner import make_plan
from launch.sky_feasibility import feasible
spec = parse_spec({"name": "big", "model": "meta-llama/Llama-3.1-8B", "method": "qlora",
                   "data": {"examples": 20000, "tokens_per_example": 512},
                   "sky": {"secrets": ["HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]}})
plan = make_plan(spec, load_offers(), keep=10**6)
placements = [o.placement for o in plan.options][:int(sys.argv[1])]
start = time.perf_counter()
verdict = feasible(spec, placements, environ={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})
print(json.dumps({"seconds": time.perf_counter() - start, "placements": len(placements),
                  "offers": len({(p.provider, p.instance_type, p.gpu, p.gpu_count, p.spot) for p in placements}),
                  "launchable": len(verdict.launchable)}))
"""


def one_run(count: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _ONE_RUN, str(count)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = {}
    for label, count in (("kept_options", 100), ("whole_ranking", 10**6)):
        runs = [one_run(count) for _ in range(args.runs)]
        results[label] = {"median_seconds": round(statistics.median(r["seconds"] for r in runs), 3),
                          "runs_seconds": [round(r["seconds"], 3) for r in runs],
                          "placements": runs[0]["placements"], "distinct_offers": runs[0]["offers"],
                          "launchable": runs[0]["launchable"]}
        print(f"{label}: {results[label]['placements']} placements ({results[label]['distinct_offers']} offers), "
              f"median {results[label]['median_seconds']} s over {args.runs} cold runs")
    out = ROOT / "bench" / "results" / "sky-feasibility.json"
    out.write_text(json.dumps({"command": "python bench/bench_sky_feasibility.py --runs " + str(args.runs),
                               "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                           "platform": platform.platform(),
                                           # a shared machine: its load inflates every figure here
                                           "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()]},
                               **results}, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
