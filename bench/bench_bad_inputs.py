"""How long the bad-input corpus takes (tests/bad_inputs.py via tests/test_bad_inputs.py; target:
under about 2 minutes on 2 cores, since it runs in every `.ci/run`).

Runs the test file once with pytest in a subprocess and reports its wall time and its CPU time
(its own and its children's: the console-script and recipe subprocesses). On a shared machine the
wall time follows the load; the CPU time is what the run costs, and on an idle 2-core machine the
wall time is close to it (the cases run one after another). Writes bench/results/bad-inputs.json.

Usage: python bench/bench_bad_inputs.py
"""
from __future__ import annotations

import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 120.0


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from bad_inputs import corpus

    cases = corpus()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_bad_inputs.py"],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", summary)) else 0
    result = {
        "what": "tests/test_bad_inputs.py: the bad-input corpus against plan, launch, other commands and the recipe",
        "cases": len(cases),
        "tests_passed": passed,
        "pytest_summary": summary,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "load_average_1min_at_start": round(load, 2),
        "cores": os.cpu_count(),
        "target_seconds": TARGET_SECONDS,
        "cpu_within_target": cpu < TARGET_SECONDS,
        "python": platform.python_version(),
        "measured_on": date.today().isoformat(),
    }
    out = ROOT / "bench" / "results" / "bad-inputs.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
