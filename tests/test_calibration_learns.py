"""Calibration learns: the tiny demo run 3 times on the local backend, `spotune calibrate` between
runs. Real training, the real local backend and ledger. The shipped CPU speed is from an idle
machine, so on a busy shared one the first plan is far off and the runs themselves correct it."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import pytest
import yaml

from tests.tiny_jobs import REPO, ledger_of, spotune

pytestmark = pytest.mark.slow

DEMO = REPO / "recipes" / "configs" / "tiny-demo.yaml"
STEPS = 4


def demo_spec(directory) -> str:
    spec = yaml.safe_load(DEMO.read_text())
    spec["data"]["path"] = str((DEMO.parent / spec["data"]["path"]).resolve())
    spec["train"]["max_steps"] = STEPS
    path = directory / "tiny-demo.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@dataclass
class Run:
    planned_hours: float
    measured_hours: float
    quoted_hours: list            # the interval the launch's quote gave
    quoted_speed_error: float     # tokens/s within planned x/÷ this
    speed_source: str
    planned_tokens_per_second: float
    measured_tokens_per_second: float  # median of its steps

    @property
    def error(self) -> float:
        return abs(self.planned_hours - self.measured_hours) / self.measured_hours


def finished_run(state, job_id) -> Run:
    with ledger_of(state) as ledger:
        job = ledger.get_job(job_id)
        (attempt,) = [a for a in ledger.attempts(job_id) if a.kind == "training"]
        rates = [s.tokens_per_second for s in ledger.samples(job_id) if s.tokens_per_second]
    chosen = next(o for o in job.estimate.plan["options"] if o["rank"] == job.estimate.chosen_rank)
    measured = (attempt.ended_at - attempt.started_at).total_seconds() / 3600
    return Run(job.estimate.expected_hours, measured, chosen["interval"]["hours"],
               chosen["interval"]["speed_error_factor"], chosen["interval"]["speed_source"], job.estimate.tokens_per_second,
               statistics.median(rates))


def test_three_runs_with_calibrate_between_plan_the_speeds_they_measured(tmp_path):
    state = tmp_path / "state"
    spec = demo_spec(tmp_path)
    env = {"SPOTUNE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
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
    # Each calibrated quote's interval holds its run's measured time whenever the run went at a speed
    # inside the range the quote assumed: the start-up fit, checkpoint writes and training add up as
    # the quote says. Not asserted: "the planned time's error falls after the first run". On this
    # shared 2-core machine other processes swing a 4-step run's speed 20x between runs and within
    # one (seen: 950 / 20,000 / 1,000 tokens/s in three runs; 4,400 -> 280 mid-run), so which plan
    # lands closer is decided by that noise; the errors are printed.
    errors = [run.error for run in runs]
    for n, run in enumerate(runs[1:], 2):
        low, high = run.quoted_hours
        within = (run.planned_tokens_per_second / run.quoted_speed_error <= run.measured_tokens_per_second
                  <= run.planned_tokens_per_second * run.quoted_speed_error)
        print(f"run {n}: took {run.measured_hours * 3600:.1f} s, planned {run.planned_hours * 3600:.1f} s, quoted "
              f"{low * 3600:.1f}-{high * 3600:.1f} s; its speed {'was' if within else 'was NOT'} in the quoted range")
        if within:
            assert low <= run.measured_hours <= high
    print(f"planned-time errors by run: {[round(e, 3) for e in errors]}")
