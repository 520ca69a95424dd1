"""How fast the ledger records what a watcher feeds it, on SQLite (default) or PostgreSQL (--db).

Measures, on a fresh database: opening an up-to-date ledger (the migration check every CLI call
pays), ingesting an events.jsonl of N training steps in one go, one watch tick's incremental
ingest (a few new lines after N), reconciling a job with N progress samples, two processes
writing at once (jobs created + attempts upserted per second, all of them), and a whole watch tick
(Watcher.tick: poll, ingest, spend, progress, budget guard) on a job of 100 samples and on one of
100,000, which should cost the same. Prints the figures and writes bench/results/ledger.json (or --out).

Usage: python bench/bench_ledger.py [--steps 20000] [--tick-samples 100,100000] [--db postgresql+psycopg://...] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from contract.backend import Observation, ObservedAttempt  # noqa: E402
from contract.placement import Placement  # noqa: E402
from orchestrator.ledger import Ledger  # noqa: E402
from orchestrator.quote import Offer, Option, Plan  # noqa: E402
from orchestrator.reconcile import reconcile_job  # noqa: E402
from orchestrator.watch import Watcher  # noqa: E402
from contract.spec import parse_spec  # noqa: E402
from fake_backend import FixedBackend  # noqa: E402

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)
PLACEMENT = Placement("aws", "us-east-1", "H100", 1, True, Decimal("2.4900"))


def plan() -> Plan:
    offer = Offer("aws", "us-east-1", "p5.xlarge", "H100", 1, 80.0, Decimal("6.88"), Decimal("2.49"))
    option = Option(1, offer, True, Decimal("2.49"), 4, 8, False, 3000.0, 40.0, 2.0, 0.2, Decimal("5.478"))
    return Plan("bench", "llama", 8_000_000_000, "qlora", 21_600_000, (option,), (), (), "bundled 2026-11-22")


def spec(name: str, budget: float | None = None):
    raw = {"name": name, "model": "llama", "method": "qlora", "data": {"examples": 1000, "tokens_per_example": 512}}
    if budget is not None:
        raw["constraints"] = {"budget": budget}
    return parse_spec(raw)


def step_line(step: int, attempt: int = 1) -> str:
    return json.dumps({"event": "step", "time": (T0 + timedelta(seconds=step)).timestamp(), "attempt": attempt,
                       "step": step, "tokens": 4096 * step, "loss": 1.5, "lr": 1e-4, "tokens_per_second": 3000.0}) + "\n"


CHECKPOINT_EVERY = 10  # steps; a long job has proportionally many checkpoints


def line(kind: str, second: float, attempt: int, **fields) -> str:
    return json.dumps({"event": kind, "time": (T0 + timedelta(seconds=second)).timestamp(), "attempt": attempt,
                       **fields}) + "\n"


def long_job(ledger: Ledger, tmp: Path, samples: int) -> tuple[str, Path, Observation, int]:
    """A job three attempts long (two preemptions, the third still running) with `samples` step
    samples in all, a checkpoint every CHECKPOINT_EVERY steps, each attempt resuming from the last."""
    job_id = ledger.create_job(spec("tick", budget=1e9), "name: tick\n", "local", plan(), 1)
    events = tmp / f"{job_id}.events.jsonl"
    per_attempt, second, resumed, attempts = samples // 3, 0.0, 0, []
    with events.open("w") as f:
        for n in (1, 2, 3):
            started = second
            f.write(line("start", second, n, resumed_from_step=resumed or None, total_steps=10 * samples,
                         total_tokens=40_960 * samples))
            last_step = resumed + per_attempt + (samples % 3 if n == 3 else 0)
            for step in range(resumed + 1, last_step + 1):
                second += 1
                f.write(line("step", second, n, step=step, tokens=4096 * step, loss=1.5, lr=1e-4,
                             tokens_per_second=3000.0 + step % 7))
                if step % CHECKPOINT_EVERY == 0:
                    f.write(line("checkpoint", second, n, step=step, path=f"s3://bench/step-{step}", seconds=2.0,
                                 bytes=1 << 20))
            if n < 3:
                second += 1
                f.write(line("preempted", second, n, step=last_step, signal="SIGTERM"))
                resumed = last_step - last_step % CHECKPOINT_EVERY
            ended = None if n == 3 else T0 + timedelta(seconds=second)
            attempts.append(ObservedAttempt(n, PLACEMENT, T0 + timedelta(seconds=started), ended,
                                            None if n == 3 else "preempted"))
            second += 30
    ledger.upsert_attempt(job_id, attempts[0])
    ledger.ingest_events(job_id, events)
    return job_id, events, Observation("running", tuple(attempts), events_path=events), last_step


def watch_ticks(ledger: Ledger, tmp: Path, lengths: list[int], ticks: int) -> list[dict]:
    """Median wall time of a watch tick on a job of each length, each tick after the recipe appended
    two more steps. Jobs take turns tick by tick, so a busy moment on the machine hits them alike."""
    jobs = []
    for samples in lengths:
        job_id, events, observation, step = long_job(ledger, tmp, samples)
        watcher = Watcher(ledger, job_id, FixedBackend(observation), "bench-external-id")
        watcher.tick()  # records attempts 2 and 3; the timed ticks then see only new lines
        jobs.append({"samples": samples, "checkpoints": len(ledger.checkpoints(job_id)), "watcher": watcher,
                     "events": events, "step": step, "times": []})
    for _ in range(ticks):
        for job in jobs:
            with job["events"].open("a") as f:
                for _ in range(2):
                    job["step"] += 1
                    f.write(line("step", 10 * job["samples"] + job["step"], 3, step=job["step"],
                                 tokens=4096 * job["step"], loss=1.4, lr=1e-4, tokens_per_second=3100.0))
            t = time.perf_counter()
            tick = job["watcher"].tick()
            job["times"].append(time.perf_counter() - t)
            assert tick.progress.step == job["step"] and tick.job.status == "running", tick
    return [{"samples": j["samples"], "checkpoints": j["checkpoints"], "ticks": ticks,
             "tick_ms_median": round(statistics.median(j["times"]) * 1000, 2),
             "tick_ms_min": round(min(j["times"]) * 1000, 2)} for j in jobs]


def _writer(url: str, jobs: int, barrier) -> None:
    ledger = Ledger(url)
    barrier.wait()
    for i in range(jobs):
        job_id = ledger.create_job(spec("race"), "name: race\n", "local", plan(), 1)
        ledger.upsert_attempt(job_id, ObservedAttempt(1, PLACEMENT, T0))
        ledger.upsert_attempt(job_id, ObservedAttempt(1, PLACEMENT, T0, T0 + timedelta(hours=1), "finished"))
    ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--jobs", type=int, default=50, help="jobs each of the two concurrent writers records")
    parser.add_argument("--tick-samples", default="100,100000",
                        help="job lengths (step samples) to time a watch tick at; the first is the baseline")
    parser.add_argument("--ticks", type=int, default=21, help="watch ticks timed per job length")
    parser.add_argument("--db", default=None, help="ledger URL (default: a fresh SQLite file)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ledger.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    url = args.db or f"sqlite:///{tmp / 'ledger.db'}"

    t = time.perf_counter()
    ledger = Ledger(url)
    first_open = time.perf_counter() - t
    reopen = []
    for _ in range(5):
        t = time.perf_counter()
        Ledger(url).close()
        reopen.append(time.perf_counter() - t)

    job_id = ledger.create_job(spec("bench"), "name: bench\n", "local", plan(), 1)
    ledger.upsert_attempt(job_id, ObservedAttempt(1, PLACEMENT, T0))
    events = tmp / "events.jsonl"
    events.write_text(json.dumps({"event": "start", "time": T0.timestamp(), "attempt": 1, "resumed_from_step": None})
                      + "\n" + "".join(step_line(s) for s in range(1, args.steps + 1)))
    t = time.perf_counter()
    ingested = ledger.ingest_events(job_id, events)
    bulk = time.perf_counter() - t

    ticks = []
    for s in range(args.steps + 1, args.steps + 21):
        with events.open("a") as f:
            f.write(step_line(s))
        t = time.perf_counter()
        ledger.ingest_events(job_id, events)
        ticks.append(time.perf_counter() - t)

    t = time.perf_counter()
    rec = reconcile_job(ledger, job_id, now=T0 + timedelta(hours=3))
    reconcile_s = time.perf_counter() - t

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    workers = [ctx.Process(target=_writer, args=(url, args.jobs, barrier)) for _ in range(2)]
    for w in workers:
        w.start()
    barrier.wait()
    t = time.perf_counter()
    for w in workers:
        w.join()
    concurrent = time.perf_counter() - t
    assert [w.exitcode for w in workers] == [0, 0]
    recorded = sum(1 for j in ledger.list_jobs() if j.name == "race")
    assert recorded == 2 * args.jobs, recorded

    lengths = [int(n) for n in args.tick_samples.split(",")]
    tick_runs = watch_ticks(ledger, tmp, lengths, args.ticks)
    watch_tick = {"jobs": tick_runs,
                  "ratio_longest_to_shortest": round(tick_runs[-1]["tick_ms_median"] / tick_runs[0]["tick_ms_median"], 2)}

    results = {
        "backend": ledger.dialect,
        "machine": f"{platform.processor() or platform.machine()}, {multiprocessing.cpu_count()} cores (shared)",
        "first_open_ms": round(first_open * 1000, 1),
        "reopen_ms_median": round(statistics.median(reopen) * 1000, 1),
        "bulk_ingest_events": ingested,
        "bulk_ingest_s": round(bulk, 3),
        "bulk_ingest_events_per_s": round(ingested / bulk),
        "tick_ingest_ms_median": round(statistics.median(ticks) * 1000, 1),
        "reconcile_ms": round(reconcile_s * 1000, 1),
        "reconciled_actual_cost": str(rec.actual_cost),
        "concurrent_writers": 2,
        "concurrent_jobs_recorded": recorded,
        "concurrent_jobs_per_s": round(recorded / concurrent, 1),
        "watch_tick": watch_tick,
    }
    ledger.close()
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
