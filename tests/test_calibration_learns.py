"""Calibration learns: the tiny demo run 3 times on the local backend, `spotune calibrate` between
runs. Real training, the real local backend and ledger. The shipped CPU figures are another
machine's (speed on 2 threads at load ~2, start-up at load ~13), so the first plan is off and the
runs themselves correct it.

The recipe runs on one thread here (OMP_NUM_THREADS=1), as in tests/test_recipe_stop.py: on a
shared 2-core machine two OpenMP threads wait at every op's barrier for a core another process
holds, and the same step takes 0.3 s or 7 s (measured: a 30-step run's steps spread 310-7,250
tokens/s on 2 threads, 8,500-13,400 on one, at load ~3). One thread is slowed by its fair share of
the CPU, so a run's speed says something about the next one."""
from __future__ import annotations

import math
import statistics
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal

import pytest
import yaml

from tests.tiny_jobs import REPO, ledger_of, spotune

pytestmark = pytest.mark.slow

DEMO = REPO / "recipes" / "configs" / "tiny-demo.yaml"
# Enough steps that the median step rate is the machine's and not one step's luck, while start-up
# (fitted apart) stays the larger part of the ~15 s run.
STEPS = 30


def demo_spec(directory) -> str:
    spec = yaml.safe_load(DEMO.read_text())
    spec["data"]["path"] = str((DEMO.parent / spec["data"]["path"]).resolve())
    spec["train"]["max_steps"] = STEPS
    path = directory / "tiny-demo.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


PARTS = ("start-up", "training", "checkpoint writes")


@dataclass
class Run:
    planned_hours: float
    measured_hours: float
    quoted_hours: list            # the interval the launch's quote gave
    quoted_speed_error: float     # tokens/s within planned x/÷ this
    speed_source: str
    planned_tokens_per_second: float
    measured_tokens_per_second: float  # median of its steps
    planned_parts: dict           # PARTS -> hours, from the quote's cost lines
    measured_parts: dict          # the same split of the billed hours, as `spotune calibrate` splits them

    @property
    def error(self) -> float:
        return abs(self.planned_hours - self.measured_hours) / self.measured_hours

    @property
    def error_by_part(self) -> float:
        """The planned time's error part by part: a plan whose too-long start-up hides its too-fast
        speed is not right, however close its total (the shipped start-up is from a loaded machine,
        its speed from a quiet one, and on a half-loaded machine the two cancel)."""
        return sum(abs(self.planned_parts[p] - self.measured_parts[p]) for p in PARTS) / self.measured_hours


def finished_run(state, job_id) -> Run:
    with ledger_of(state) as ledger:
        job = ledger.get_job(job_id)
        (attempt,) = [a for a in ledger.attempts(job_id) if a.kind == "training"]
        rates = [s.tokens_per_second for s in ledger.samples(job_id) if s.tokens_per_second]
        writes = sum(c.seconds or 0.0 for c in ledger.checkpoints(job_id)) / 3600
    chosen = next(o for o in job.estimate.plan["options"] if o["rank"] == job.estimate.chosen_rank)
    price = Decimal(chosen["price_per_hour"])
    planned = {part: 0.0 for part in PARTS}
    for line in chosen["lines"]:
        planned[line["item"]] = float(Decimal(line["amount"]) / price)
    measured = (attempt.ended_at - attempt.started_at).total_seconds() / 3600
    median = statistics.median(rates)
    training = attempt.tokens / median / 3600
    return Run(job.estimate.expected_hours, measured, chosen["interval"]["hours"],
               chosen["interval"]["speed_error_factor"], chosen["interval"]["speed_source"], job.estimate.tokens_per_second,
               median, planned,
               {"start-up": measured - training - writes, "training": training, "checkpoint writes": writes})


def test_three_runs_with_calibrate_between_plan_the_speeds_they_measured(tmp_path):
    state = tmp_path / "state"
    spec = demo_spec(tmp_path)
    env = {"SPOTUNE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # The first run on an empty cache would also build the tiny model, a start-up cost the later
    # runs do not pay: built here, so that the three runs do the same work.
    built = subprocess.run([sys.executable, "-c", "import sys; from recipes.tiny import ensure_tiny_model; "
                            "ensure_tiny_model(sys.argv[1])", env["SPOTUNE_CACHE"]], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    runs = []
    for n in range(3):
        launched = spotune(state, "launch", spec, env=env)
        assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-2000:]
        with ledger_of(state) as ledger:
            job_id = max(ledger.list_jobs(), key=lambda j: j.created_at).id
        runs.append(finished_run(state, job_id))
        calibrated = spotune(state, "calibrate", env=env)
        assert calibrated.returncode == 0, calibrated.stderr
    # What the plan learns is exact: after one run it plans that run's speed, after two their
    # geometric mean (the median of two log-ratios), on the same config; the quote says so.
    assert runs[1].planned_tokens_per_second == pytest.approx(runs[0].measured_tokens_per_second, rel=1e-6)
    assert runs[2].planned_tokens_per_second == pytest.approx(
        math.sqrt(runs[0].measured_tokens_per_second * runs[1].measured_tokens_per_second), rel=1e-6)
    assert [run.speed_source for run in runs] == ["shipped calibration", "1 run in your ledger", "2 runs in your ledger"]
    # The planned time's error falls after the first run: the shipped figures are another machine's,
    # each later plan is this machine's own runs. Part by part, so that it cannot pass or fail by
    # a coincidence of two wrong parts (Run.error_by_part); the totals' errors are printed.
    errors = [run.error_by_part for run in runs]
    print(f"planned-time errors by run, part by part: {[round(e, 3) for e in errors]}; "
          f"of the totals: {[round(run.error, 3) for run in runs]}")
    for n, run in enumerate(runs, 1):
        low, high = run.quoted_hours
        print(f"run {n}: took {run.measured_hours * 3600:.1f} s at {run.measured_tokens_per_second:,.0f} tokens/s, "
              f"planned {run.planned_hours * 3600:.1f} s at {run.planned_tokens_per_second:,.0f}, quoted "
              f"{low * 3600:.1f}-{high * 3600:.1f} s (speed x/÷ {run.quoted_speed_error:.3g}, {run.speed_source}); "
              f"planned / measured s: " + ", ".join(f"{p} {run.planned_parts[p] * 3600:.2f} / {run.measured_parts[p] * 3600:.2f}"
                                                   for p in PARTS))
    assert errors[1] < errors[0] and errors[2] < errors[0]
    # Each calibrated quote's interval holds the next run's measured time.
    for run in runs[1:]:
        low, high = run.quoted_hours
        assert low <= run.measured_hours <= high
    # From two runs on, the width is the runs' own spread, not the shipped CPU error (x/÷ 94).
    assert runs[2].quoted_speed_error < runs[1].quoted_speed_error
