"""How fast the ledger records what a watcher feeds it, on SQLite (default) or PostgreSQL (--db).

Measures, on a fresh database: opening an up-to-date ledger (the migration check every CLI call
pays), ingesting an events.jsonl of N training steps in one go, one watch tick's incremental
ingest (a few new lines after N), reconciling a job with N progress samples, and two processes
writing at once (jobs created + attempts upserted per second, all of them). Prints the figures and
writes bench/results/ledger.json (or --out).

Usage: python bench/bench_ledger.py [--steps 20000] [--db postgresql+psycopg://...] [--out FILE]
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

from launch.base import ObservedAttempt, Placement  # noqa: E402
from orchestrator.ledger import Ledger  # noqa: E402
from orchestrator.quote import Offer, Option, Plan  # noqa: E402
from orchestrator.reconcile import reconcile_job  # noqa: E402
from orchestrator.spec import parse_spec  # noqa: E402

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)
PLACEMENT = Placement("aws", "us-east-1", "H100", 1, True, Decimal("2.4900"))


def plan() -> Plan:
    offer = Offer("aws", "us-east-1", "p5.xlarge", "H100", 1, 80.0, Decimal("6.88"), Decimal("2.49"))
    option = Option(1, offer, True, Decimal("2.49"), 4, 8, False, 3000.0, 40.0, 2.0, 0.2, Decimal("5.478"))
    return Plan("bench", "llama", 8_000_000_000, "qlora", 21_600_000, (option,), (), (), "bundled 2026-11-22")


def spec(name: str):
    return parse_spec({"name": name, "model": "llama", "method": "qlora",
                       "data": {"examples": 1000, "tokens_per_example": 512}})


def step_line(step: int, attempt: int = 1) -> str:
    return json.dumps({"event": "step", "time": (T0 + timedelta(seconds=step)).timestamp(), "attempt": attempt,
                       "step": step, "tokens": 4096 * step, "loss": 1.5, "lr": 1e-4, "tokens_per_second": 3000.0}) + "\n"


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
    }
    ledger.close()
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
