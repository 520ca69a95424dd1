"""The ledger stores what happened exactly (Decimal money, UTC times), never rewrites an estimate,
ingests events idempotently, keeps secrets out, and survives concurrent writers."""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import re
import shutil
import subprocess
import sys
import zipfile
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from ledger_factory import (at, event, make_offer, make_option, make_plan, make_spec, observed, spec_yaml,
                            write_events)
from contract.errors import UserError
from orchestrator.ledger import Ledger, LedgerError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ledger(ledger_url):
    with Ledger(ledger_url) as opened:
        yield opened


def new_job(ledger: Ledger, name="demo", plan=None, rank=1, **spec_kw) -> str:
    return ledger.create_job(make_spec(name, **spec_kw), spec_yaml(name), "local", plan or make_plan(job=name), rank)


# ---- schema -------------------------------------------------------------------------------------

def test_opening_migrates_to_head_and_the_schema_matches_the_models(ledger_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from orchestrator.ledger_tables import Base
    from orchestrator.migrations import head_revision

    Ledger(ledger_url).close()
    Ledger(ledger_url).close()  # reopening an up-to-date ledger is a no-op
    engine = create_engine(ledger_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn)
        assert context.get_current_revision() == head_revision()
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_migrations_downgrade_to_nothing_and_upgrade_again(ledger_url):
    from alembic import command

    from orchestrator.migrations import alembic_config

    Ledger(ledger_url).close()
    engine = create_engine(ledger_url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    with engine.connect() as conn:
        assert {"jobs", "estimates", "attempts"}.isdisjoint(
            conn.dialect.get_table_names(conn))
    engine.dispose()
    with Ledger(ledger_url) as ledger:
        assert ledger.list_jobs() == []


@pytest.mark.parametrize("from_revision", ["0001", "0002", "0003", "0004", "0005", "0006"])
def test_upgrading_an_older_ledger_keeps_every_row(ledger_url, from_revision):
    """A migration that rebuilds the jobs table (SQLite changes a column that way) must not let the
    drop cascade into the estimates, attempts and events that belong to the jobs."""
    from alembic import command

    from orchestrator.migrations import alembic_config

    with Ledger(ledger_url) as ledger:
        job_id = new_job(ledger)
        ledger.upsert_attempt(job_id, observed(1, 0, 30, "preempted"))
        ledger.upsert_attempt(job_id, observed(2, 31, 60, "finished"))
    tables = ("jobs", "estimates", "attempts")
    engine = create_engine(ledger_url)

    def counts() -> dict:
        with engine.connect() as conn:
            return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in tables}

    before = counts()
    with engine.begin() as conn:  # a plain engine: SQLite's foreign keys are off, as an old spotune left them
        command.downgrade(alembic_config(conn), from_revision)
    assert counts() == before
    with Ledger(ledger_url) as ledger:
        assert [a.n for a in ledger.attempts(job_id) if a.n > 0] == [1, 2]
    assert counts() == before
    engine.dispose()


def test_a_ledger_from_a_newer_spotune_is_refused_with_one_line(ledger_url):
    Ledger(ledger_url).close()
    engine = create_engine(ledger_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(LedgerError, match="has schema revision 9999, which this spotune does not know: upgrade spotune"):
        Ledger(ledger_url)


def test_sqlite_ledger_uses_wal_and_a_busy_timeout(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'state' / 'ledger.db'}")  # creates the state dir
    with ledger._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000


def test_unusable_urls_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a database URL"):
        Ledger("no-such-scheme")
    with pytest.raises(UserError, match="unsupported ledger URL mysql://x@y/z: the ledger runs on SQLite or PostgreSQL"):
        Ledger("mysql://x@y/z")
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(UserError, match="cannot create the ledger's directory"):
        Ledger(f"sqlite:///{tmp_path / 'a-file'}/sub/ledger.db")
    with pytest.raises(UserError, match=r"cannot open ledger at postgresql\+psycopg://spotune:\*\*\*@127.0.0.1:1/x"):
        Ledger("postgresql://spotune:hunter2@127.0.0.1:1/x?connect_timeout=2")


# ---- jobs and estimates -------------------------------------------------------------------------

def test_create_job_records_the_job_and_its_estimate_exactly(ledger):
    alternative = make_option(rank=2, offer=make_offer("gcp", "europe-west4", "A100", spot_price="0.41783"),
                              price="0.41783", tokens_per_second=2500.0, hours=0.4, overhead=0.05)
    chosen = make_option(rank=1, price="0.3621", expected_cost="0.398310")
    plan = make_plan(chosen, alternative)
    job_id = ledger.create_job(make_spec("demo", budget=2.5), spec_yaml(), "local", plan, chosen_rank=2)

    assert re.fullmatch(r"demo-\d{8}-[0-9a-f]{4}", job_id)
    job = ledger.get_job(job_id)
    assert (job.name, job.status, job.backend, job.method, job.model) == ("demo", "pending", "local", "lora", "tiny-llama")
    assert job.spec_yaml == spec_yaml() and job.spec_hash == make_spec("demo", budget=2.5).spec_hash()
    assert job.budget == Decimal("2.5")
    est = job.estimate
    assert est.plan == plan.to_json()  # the ranked alternatives exactly as planned
    assert (est.chosen_rank, est.provider, est.region, est.gpu) == (2, "gcp", "europe-west4", "A100")
    assert est.price_per_hour == Decimal("0.41783") and isinstance(est.price_per_hour, Decimal)
    assert est.expected_cost == Decimal("0.188024")  # 0.41783 x 0.45, kept to the micro-dollar
    assert (est.hours, est.preemption_overhead_hours, est.tokens_per_second) == (0.4, 0.05, 2500.0)
    assert est.catalog_snapshot == "bundled 2026-11-22" and est.total_tokens == 3_600_000
    assert job.created_at.tzinfo is not None and job.created_at.utcoffset() == timedelta(0)


def test_create_job_with_a_rank_the_plan_lacks_records_nothing(ledger):
    with pytest.raises(ValueError, match="no option with rank 7"):
        new_job(ledger, rank=7)
    assert ledger.list_jobs() == []


def test_estimates_are_never_rewritten(ledger, ledger_url):
    job_id = new_job(ledger)
    before = ledger.get_job(job_id).estimate
    public = {name for name in dir(Ledger) if not name.startswith("_")}
    assert not {name for name in public if "estimate" in name or name.startswith(("update", "edit"))}
    ledger.set_status(job_id, "running")
    ledger.set_external_id(job_id, "ext-1")
    ledger.upsert_attempt(job_id, observed(1, 0, 30, "finished", price="9.99"))
    assert ledger.get_job(job_id).estimate == before
    # Not even raw SQL from another client can change it.
    engine = create_engine(ledger_url.replace("postgresql://", "postgresql+psycopg://"))
    with pytest.raises(DBAPIError, match="estimates are never rewritten"):
        with engine.begin() as conn:
            conn.execute(text("UPDATE estimates SET expected_cost = '0.01'"))
    engine.dispose()
    assert ledger.get_job(job_id).estimate == before


def test_money_and_times_round_trip_exactly(ledger):
    job_id = new_job(ledger)
    cest = timezone(timedelta(hours=1))
    started = datetime(2026, 11, 20, 10, 0, 0, 123456, tzinfo=cest)
    from contract.backend import ObservedAttempt
    from ledger_factory import placement

    ledger.upsert_attempt(job_id, ObservedAttempt(1, placement(price="11.81123"), started))
    attempt = ledger.attempts(job_id)[0]
    assert attempt.price_per_hour == Decimal("11.81123")
    assert attempt.started_at == started and attempt.started_at.utcoffset() == timedelta(0)
    assert attempt.started_at.hour == 9


def test_times_round_trip_whatever_the_postgres_session_timezone(ledger_url):
    if not ledger_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite has no session time zone")
    with Ledger(ledger_url + "?options=-c%20timezone%3DAmerica/New_York") as ledger:
        job_id = new_job(ledger)
        ledger.upsert_attempt(job_id, observed(1, 0, 30, "finished"))
        attempt = ledger.attempts(job_id)[0]
    assert (attempt.started_at, attempt.ended_at) == (at(0), at(30))
    assert attempt.started_at.utcoffset() == timedelta(0)


def test_naive_times_and_float_money_are_refused(ledger):
    from contract.backend import ObservedAttempt
    from ledger_factory import placement

    job_id = new_job(ledger)
    with pytest.raises(Exception, match="naive datetime"):
        ledger.upsert_attempt(job_id, ObservedAttempt(1, placement(), datetime(2026, 11, 20, 9, 0)))
    bad = ObservedAttempt(1, dataclasses.replace(placement(), price_per_hour=0.1), at(0))
    with pytest.raises(Exception, match="never float"):
        ledger.upsert_attempt(job_id, bad)
    assert ledger.attempts(job_id) == []


def test_get_job_matches_a_unique_prefix_and_names_the_problem_otherwise(ledger):
    first, second = new_job(ledger, "alpha"), new_job(ledger, "alps")
    assert ledger.get_job(first).id == first
    assert ledger.get_job(first[:-2]).id == first
    assert ledger.get_job("alph").id == first
    with pytest.raises(LedgerError, match=r"'al' matches several jobs \(alpha-.*, alps-.*\)"):
        ledger.get_job("al")
    with pytest.raises(LedgerError, match="no job matching 'beta'"):
        ledger.get_job("beta")
    with pytest.raises(LedgerError, match="no job matching"):
        ledger.get_job("al%")  # LIKE wildcards are literal
    assert [j.id for j in ledger.list_jobs()] == [first, second]


def test_set_status_validates_status_and_job(ledger):
    job_id = new_job(ledger)
    ledger.set_status(job_id, "failed", "exit code 1")
    job = ledger.get_job(job_id)
    assert (job.status, job.failure_reason) == ("failed", "exit code 1")
    assert job.updated_at >= job.created_at
    with pytest.raises(ValueError, match="unknown job status 'done'"):
        ledger.set_status(job_id, "done")
    with pytest.raises(LedgerError, match="no job 'nope'"):
        ledger.set_status("nope", "running")


# ---- attempts -----------------------------------------------------------------------------------

def test_upsert_attempt_is_idempotent_and_fills_end_fields_when_they_appear(ledger):
    job_id = new_job(ledger)
    ledger.upsert_attempt(job_id, observed(1, 0))
    ledger.upsert_attempt(job_id, observed(1, 0))
    (open_attempt,) = ledger.attempts(job_id)
    assert open_attempt.ended_at is None and open_attempt.end_reason is None
    ledger.upsert_attempt(job_id, observed(1, 0, 42, "preempted", detail="SIGTERM from spot reclaim"))
    ledger.upsert_attempt(job_id, observed(1, 0))  # a stale poll never erases the end
    ledger.upsert_attempt(job_id, observed(2, 45, price="0.5", region="us-west-2"))
    first, second = ledger.attempts(job_id)
    assert (first.ended_at, first.end_reason, first.detail) == (at(42), "preempted", "SIGTERM from spot reclaim")
    assert (second.n, second.region, second.price_per_hour, second.ended_at) == (2, "us-west-2", Decimal("0.5"), None)


def test_secrets_never_enter_the_ledger(ledger, tmp_path):
    job_id = new_job(ledger)
    ledger.upsert_attempt(job_id, observed(1, 0, 5, "failed",
                                           detail="env HF_TOKEN=hf_AbCdEfGhIjKlMnOpQrStUvWxYz12 AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG"))
    ledger.set_status(job_id, "failed", "launch failed with key AKIAIOSFODNN7EXAMPLE and tokens=512")
    events = tmp_path / "events.jsonl"
    write_events(events, [event("error", 4, 1, message="login failed: WANDB_API_KEY='0123456789abcdef'")])
    ledger.ingest_events(job_id, events)

    attempt, job = ledger.attempts(job_id)[0], ledger.get_job(job_id)
    (error,) = ledger.run_events(job_id)
    stored = " ".join([attempt.detail, job.failure_reason, json.dumps(error.payload)])
    for secret in ("hf_AbCdEf", "wJalrXUtnFEMI", "AKIAIOSFODNN7EXAMPLE", "0123456789abcdef"):
        assert secret not in stored
    assert "HF_TOKEN=***" in attempt.detail and "AWS_SECRET_ACCESS_KEY: ***" in attempt.detail
    assert "tokens=512" in job.failure_reason  # ordinary words survive


def test_redact_keeps_ordinary_text():
    from orchestrator.redact import redact

    assert redact("step 10 tokens=512 max_tokens: 8 loss=1.2") == "step 10 tokens=512 max_tokens: 8 loss=1.2"
    assert redact("postgresql://u:pw@host/db") == "postgresql://u:***@host/db"
    assert redact("Authorization: Bearer abcdefghijkl") == "Authorization: Bearer ***"
    assert redact("hf_token: hf_abcdefghijklmnopqrstuvwx") == "hf_token: ***"


# ---- events ---------------------------------------------------------------------------------------

def run_events_for_two_attempts():
    return [
        event("start", 1, 1, resumed_from_step=None, device="cuda", gpu_name="A10G", gpu_count=1,
              total_steps=40, total_tokens=40_000),
        *[event("step", 1 + s, 1, step=s, tokens=1000 * s, loss=2.0 - s / 100, lr=2e-4, tokens_per_second=900.0)
          for s in range(1, 21)],
        event("checkpoint", 15.5, 1, step=15, path="checkpoints/step-15", seconds=3.5, bytes=123456),
        event("preempted", 21.5, 1, step=20, signal="SIGTERM"),
        event("start", 25, 2, resumed_from_step=15, device="cuda", gpu_name="A10G", gpu_count=1,
              total_steps=40, total_tokens=40_000),
        *[event("step", 11 + s, 2, step=s, tokens=1000 * s, loss=1.9, lr=1e-4, tokens_per_second=1100.0)
          for s in range(16, 41)],
        event("finished", 52, 2, step=40, tokens=40_000, final_loss=1.5, train_seconds=2000.0, output_path="output"),
    ]


def test_ingest_events_is_idempotent_and_resumes_after_a_partial_line(ledger, tmp_path):
    job_id = new_job(ledger)
    path = tmp_path / "events.jsonl"
    events = run_events_for_two_attempts()
    write_events(path, events[:10])
    with path.open("a") as f:
        f.write(json.dumps(events[10])[:17])  # the recipe is mid-write
    assert ledger.ingest_events(job_id, path) == 10
    assert ledger.ingest_events(job_id, path) == 0
    with path.open("a") as f:
        f.write(json.dumps(events[10])[17:] + "\n")
    write_events(path, events[11:])
    assert ledger.ingest_events(job_id, path) == len(events) - 10
    assert ledger.ingest_events(job_id, path) == 0
    # A copy of the file elsewhere (a fresh local mirror) re-reads from byte 0 and adds nothing.
    mirror = tmp_path / "mirror" / "events.jsonl"
    mirror.parent.mkdir()
    shutil.copy(path, mirror)
    assert ledger.ingest_events(job_id, mirror) == len(events)

    samples = ledger.samples(job_id)
    assert len(samples) == 20 + 25 and samples[0].time == at(2) and samples[0].loss == pytest.approx(1.99)
    (checkpoint,) = ledger.checkpoints(job_id)
    assert (checkpoint.attempt, checkpoint.step, checkpoint.bytes, checkpoint.seconds) == (1, 15, 123456, 3.5)
    assert checkpoint.verified is True  # attempt 2 resumed from it
    assert [e.event for e in ledger.run_events(job_id)] == ["start", "preempted", "start", "finished"]


def test_ingest_sets_attempt_tokens_and_resume_step_whatever_arrives_first(ledger, tmp_path):
    job_id = new_job(ledger)
    path = tmp_path / "events.jsonl"
    write_events(path, run_events_for_two_attempts())
    ledger.upsert_attempt(job_id, observed(1, 0, 22, "preempted"))
    ledger.ingest_events(job_id, path)        # attempt 2's events arrive before the backend reports it
    ledger.upsert_attempt(job_id, observed(2, 24, 53, "finished"))
    first, second = ledger.attempts(job_id)
    assert (first.tokens, first.resumed_from_step) == (20_000, None)
    # resumed at step 15 (15,000 tokens, logged by attempt 1), finished at 40,000
    assert (second.tokens, second.resumed_from_step) == (25_000, 15)


def test_a_recipe_that_always_says_attempt_1_still_gets_one_attempt_per_start(ledger, tmp_path):
    """SkyPilot recovery reruns the same task: the recipe cannot know its attempt number. Its
    redone steps are new samples of attempt 2, not duplicates of attempt 1's."""
    job_id = new_job(ledger)
    path = tmp_path / "events.jsonl"
    relabelled = [{**ev, "attempt": 1} for ev in run_events_for_two_attempts()]
    write_events(path, relabelled[:30])   # attempt 1 through step 20, its checkpoint and preemption,
    ledger.ingest_events(job_id, path)    # and attempt 2's start and first steps ...
    write_events(path, relabelled[30:])   # ... then the rest, in a later tick
    ledger.ingest_events(job_id, path)
    ledger.upsert_attempt(job_id, observed(1, 0, 22, "preempted"))
    ledger.upsert_attempt(job_id, observed(2, 24, 53, "finished"))
    assert [(s.attempt, s.step) for s in ledger.samples(job_id)][19:22] == [(1, 20), (2, 16), (2, 17)]
    first, second = ledger.attempts(job_id)
    assert (first.tokens, second.tokens, second.resumed_from_step) == (20_000, 25_000, 15)


def test_a_checkpoint_is_verified_by_the_resume_that_loads_it_and_failed_by_the_one_that_skips_it(ledger, tmp_path):
    job_id = new_job(ledger)
    path = tmp_path / "events.jsonl"
    write_events(path, [event("checkpoint", 3, 1, step=15, path="checkpoints/step-15", seconds=1.0, bytes=10),
                        event("checkpoint", 6, 1, step=30, path="checkpoints/step-30", seconds=1.0, bytes=10)])
    ledger.ingest_events(job_id, path)
    assert [c.verified for c in ledger.checkpoints(job_id)] == [None, None]  # no resume has read them yet

    write_events(path, [event("checkpoint_skipped", 8, 2, step=30, path="checkpoints/step-30",
                              reason="trainer_state.pt cannot be loaded", moved_to="checkpoints/rejected-step-30"),
                        event("start", 9, 2, resumed_from_step=15, total_steps=40, total_tokens=40_000)])
    ledger.ingest_events(job_id, path)
    assert [(c.step, c.verified) for c in ledger.checkpoints(job_id)] == [(15, True), (30, False)]
    skipped = [e for e in ledger.run_events(job_id) if e.event == "checkpoint_skipped"]
    assert [(e.attempt, e.step, e.payload["reason"]) for e in skipped] == [(2, 30, "trainer_state.pt cannot be loaded")]


def test_ingest_skips_torn_lines_and_unknown_events(ledger, tmp_path):
    job_id = new_job(ledger)
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "step", "ti\n' + json.dumps(event("from_a_newer_recipe", 1, 1)) + "\n")
    write_events(path, [event("step", 2, 1, step=1, tokens=10)])
    assert ledger.ingest_events(job_id, path) == 1
    assert ledger.ingest_events(job_id, tmp_path / "missing.jsonl") == 0


# ---- concurrency --------------------------------------------------------------------------------

def _writer(url: str, worker: int, shared_job: str, events_path: str, jobs_each: int, start_together) -> None:
    ledger = Ledger(url)
    start_together.wait(timeout=120)
    for i in range(jobs_each):
        job_id = ledger.create_job(make_spec(f"w{worker}"), spec_yaml(f"w{worker}"), "local", make_plan(), 1)
        ledger.upsert_attempt(job_id, observed(1, i))
        ledger.set_status(job_id, "running")
        ledger.upsert_attempt(job_id, observed(1, i, i + 5, "finished"))
        ledger.upsert_attempt(shared_job, observed(worker, i))  # both race on the same job
        ledger.ingest_events(shared_job, events_path)
    ledger.close()


def test_two_processes_write_one_ledger_at_once(ledger_url, tmp_path):
    ledger = Ledger(ledger_url)
    shared = new_job(ledger, "shared")
    events_path = tmp_path / "events.jsonl"
    write_events(events_path, run_events_for_two_attempts())
    ctx = multiprocessing.get_context("spawn")
    jobs_each = 12
    start_together = ctx.Barrier(2)
    workers = [ctx.Process(target=_writer, args=(ledger_url, w, shared, str(events_path), jobs_each, start_together))
               for w in (1, 2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=240)
    assert [p.exitcode for p in workers] == [0, 0]

    jobs = ledger.list_jobs()
    assert len(jobs) == 1 + 2 * jobs_each and len({j.id for j in jobs}) == len(jobs)
    for job in jobs:
        if job.name != "shared":
            assert job.status == "running"
            assert [(a.n, a.end_reason) for a in ledger.attempts(job.id)] == [(1, "finished")]
    assert [a.n for a in ledger.attempts(shared)] == [1, 2]
    assert len(ledger.samples(shared)) == 45 and len(ledger.run_events(shared)) == 4
    if ledger.dialect == "sqlite":
        with ledger._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    ledger.close()


def _record_forever(url: str, events_path: str, ready) -> None:
    ledger = Ledger(url)
    ready.set()
    while True:
        job_id = ledger.create_job(make_spec("crash"), spec_yaml("crash"), "local", make_plan(), 1)
        ledger.upsert_attempt(job_id, observed(1, 0))
        ledger.ingest_events(job_id, events_path)


def test_a_writer_killed_mid_transaction_leaves_only_whole_records(ledger_url, tmp_path):
    import os
    import signal

    from waiting import wait_until

    events_path = tmp_path / "events.jsonl"
    write_events(events_path, run_events_for_two_attempts())
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    writer = ctx.Process(target=_record_forever, args=(ledger_url, str(events_path), ready))
    writer.start()
    assert ready.wait(timeout=120)
    with Ledger(ledger_url) as reader:  # let it write a few whole jobs, then kill it wherever it is
        wait_until(lambda: len(reader.list_jobs()) >= 3, timeout=120, every=0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(timeout=30)

    with Ledger(ledger_url) as ledger:
        jobs = ledger.list_jobs()  # every job has its estimate: they are written together or not at all
        assert len(jobs) >= 2
        for job in jobs:
            assert len(ledger.samples(job.id)) in (0, 45)  # an ingest is all of the file or none of it
        # and the ledger goes on: the last job's ingest can be finished
        last = jobs[-1].id
        ledger.ingest_events(last, events_path)
        assert len(ledger.samples(last)) == 45 and len(ledger.run_events(last)) == 4
        if ledger.dialect == "sqlite":
            with ledger._engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"


# ---- packaging ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_migrations_ship_in_the_wheel_and_run_from_the_installed_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    for package in ("orchestrator", "launch", "recipes"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("spotune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "orchestrator/migrations/env.py" in names
    assert "orchestrator/migrations/script.py.mako" in names
    assert any(n.startswith("orchestrator/migrations/versions/0001_") for n in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import orchestrator.ledger as l, sys; assert l.__file__.startswith(sys.argv[1]), l.__file__;"
             "led = l.Ledger('sqlite:///x.db'); print(len(led.list_jobs()))")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); " + probe,
                          str(site)], cwd=elsewhere, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0" and (elsewhere / "x.db").exists()
