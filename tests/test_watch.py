"""A watch tick costs the same at step 100 and at step 10,000: spend comes from the attempts alone
(the very sum reconcile reports as actual), progress from a few indexed reads of the latest rows,
and both say exactly what a full read of the ledger would."""
from __future__ import annotations

import contextlib
import statistics
from decimal import Decimal

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from contract.backend import Observation
from fake_backend import FixedBackend
from ledger_factory import at, event, hand_example, make_option, make_plan, make_spec, observed, spec_yaml, write_events
from orchestrator import watch
from orchestrator.cli import app
from orchestrator.ledger import Ledger
from orchestrator.quote import money
from orchestrator.reconcile import reconcile_job, spend


def watcher_for(ledger: Ledger, job_id: str, state: str, *attempts) -> watch.Watcher:
    return watch.Watcher(ledger, job_id, FixedBackend(Observation(state, tuple(attempts))), "ext")


def progress_from_every_row(ledger: Ledger, job_id: str) -> watch.Progress:
    """What progress means, read off every sample and event (how a tick computed it before)."""
    samples, run_events = ledger.samples(job_id), ledger.run_events(job_id)
    starts = [e for e in run_events if e.event == "start"]
    totals = starts[-1].payload if starts else {}
    progress = watch.Progress(total_steps=totals.get("total_steps"), total_tokens=totals.get("total_tokens"),
                              started_attempts=frozenset(e.attempt for e in starts))
    if not samples:
        return progress
    latest = max(samples, key=lambda s: (s.attempt, s.step))
    rates = [s.tokens_per_second for s in samples if s.attempt == latest.attempt and s.tokens_per_second]
    return watch.Progress(step=latest.step, total_steps=progress.total_steps, tokens=latest.tokens,
                          total_tokens=progress.total_tokens, loss=latest.loss,
                          tokens_per_second=statistics.median(rates[-watch.THROUGHPUT_WINDOW:]) if rates else None,
                          started_attempts=progress.started_attempts)


def long_running_job(ledger: Ledger, tmp_path, steps: int):
    """Attempt 1 trains steps/2 steps (a checkpoint every 10) and is preempted; attempt 2 resumes
    from its last checkpoint and is still running. One step a second."""
    job_id = ledger.create_job(make_spec("long"), spec_yaml("long"), "local", make_plan(), 1)
    half = steps // 2
    resumed = half - half % 10
    lines = [event("start", 0, 1, resumed_from_step=None, total_steps=2 * steps, total_tokens=2000 * steps)]
    for s in range(1, half + 1):
        lines.append(event("step", s / 60, 1, step=s, tokens=1000 * s, loss=2.0, lr=1e-4, tokens_per_second=900.0 + s % 5))
        if s % 10 == 0:
            lines.append(event("checkpoint", s / 60, 1, step=s, path=f"s3://b/step-{s}", seconds=1.0, bytes=1))
    lines.append(event("preempted", half / 60, 1, step=half, signal="SIGTERM"))
    restart = half / 60 + 1
    lines.append(event("start", restart, 2, resumed_from_step=resumed, total_steps=2 * steps, total_tokens=2000 * steps))
    for i, s in enumerate(range(resumed + 1, resumed + 1 + steps - half), start=1):
        lines.append(event("step", restart + i / 60, 2, step=s, tokens=1000 * s, loss=1.9, lr=1e-4, tokens_per_second=1000.0))
    events_path = tmp_path / f"{job_id}.events.jsonl"
    write_events(events_path, lines, mode="w")
    attempts = (observed(1, 0, half / 60 + 0.5, "preempted"), observed(2, restart))
    ledger.upsert_attempt(job_id, attempts[0])
    ledger.ingest_events(job_id, events_path)
    observation = Observation("running", attempts, events_path=events_path)
    return watch.Watcher(ledger, job_id, FixedBackend(observation), "ext"), events_path, resumed + steps - half


def recipe_logs_a_step(events_path, step: int) -> None:
    write_events(events_path, [event("step", 10_000 + step / 60, 2, step=step, tokens=1000 * step, loss=1.8, lr=1e-4,
                                     tokens_per_second=1100.0)])


# ---- spend ----------------------------------------------------------------------------------------

def test_a_ticks_spend_is_reconciles_actual_cost_exactly_once_the_job_has_ended(ledger_url, tmp_path):
    with Ledger(ledger_url) as ledger:
        job_id = hand_example(ledger, tmp_path)
        tick = watcher_for(ledger, job_id, "succeeded", observed(1, 0, 36, "preempted", price="2.00"),
                           observed(2, 40, 88, "finished", price="2.50", region="us-west-2")).tick(now=at(500))
        assert tick.spent == reconcile_job(ledger, job_id, now=at(500)).actual_cost_exact == Decimal("3.20")


def test_a_ticks_spend_is_reconciles_actual_cost_exactly_while_an_attempt_runs(ledger_url, tmp_path):
    with Ledger(ledger_url) as ledger:
        job_id = hand_example(ledger, tmp_path)
        running = observed(3, 95.5, price="11.81123", region="eu-west-1")  # odd price, odd start
        watcher = watcher_for(ledger, job_id, "running", observed(1, 0, 36, "preempted", price="2.00"),
                              observed(2, 40, 88, "finished", price="2.50", region="us-west-2"), running)
        for minutes in (95.5, 101.0000017, 187.123457):
            tick = watcher.tick(now=at(minutes))
            actual = reconcile_job(ledger, job_id, now=at(minutes))
            assert actual.open and tick.spent == actual.actual_cost_exact
        assert tick.spent > Decimal("3.20") + Decimal("11.81123")  # the running attempt's 1.5 h and more


def test_status_lists_every_job_at_its_attempts_cost_without_reading_samples(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger(url) as ledger:
        ended = hand_example(ledger, tmp_path, "ended")
        ledger.set_status(ended, "succeeded")
        running = ledger.create_job(make_spec("running"), spec_yaml("running"), "local",
                                    make_plan(make_option(price="0.36", expected_cost="0.5")), 1)
        ledger.upsert_attempt(running, observed(1, 0, price="0.36"))
        ledger.set_status(running, "running")  # never given an external id, so status syncs nothing
        so_far_before = money(spend(ledger.attempts(running)))
    for full_read in ("samples", "checkpoints", "run_events"):
        monkeypatch.setattr(Ledger, full_read, lambda *a: pytest.fail(f"status read every {full_read} of a job"))

    result = CliRunner().invoke(app, ["--db", url, "status"], catch_exceptions=False, env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert "$2.20" in rows[ended] and "$3.20" in rows[ended]  # estimate, actual (reconcile's hand example)
    with Ledger(url) as ledger:
        so_far_after = money(spend(ledger.attempts(running)))
    assert "$0.50" in rows[running]
    assert f"${so_far_before:,.2f}" in rows[running] or f"${so_far_after:,.2f}" in rows[running]


# ---- progress -------------------------------------------------------------------------------------

def test_progress_read_by_query_is_what_every_row_says_after_each_event(ledger_url, tmp_path):
    """Rates that are missing or zero, fewer rates than the window and more, a resumed attempt
    whose steps are lower than its predecessor's, a start with other totals, and an attempt that
    has started but not yet stepped."""
    rates = [950.0, None, 0.0, 1010.0, 990.0, 1005.0, None, 2000.0, 1001.0, 999.0, 1003.0, 1002.0]
    lines = [event("start", 0, 1, resumed_from_step=None, total_steps=40, total_tokens=40_000),
             *[event("step", 1 + s, 1, step=s, tokens=1000 * s, loss=3.0 - s / 10, lr=1e-4, tokens_per_second=r)
               for s, r in enumerate(rates, start=1)],
             event("checkpoint", 9, 1, step=8, path="checkpoints/step-8", seconds=1.0, bytes=10),
             event("preempted", 14, 1, step=12, signal="SIGTERM"),
             event("start", 20, 2, resumed_from_step=8, total_steps=44, total_tokens=44_000),
             event("step", 21, 2, step=9, tokens=9000, loss=2.2, lr=1e-4, tokens_per_second=0.0),
             event("step", 22, 2, step=10, tokens=10_000, loss=2.1, lr=1e-4),
             event("step", 23, 2, step=11, tokens=11_000, loss=2.0, lr=1e-4, tokens_per_second=1500.0),
             event("step", 24, 2, step=12, tokens=12_000, loss=1.9, lr=1e-4, tokens_per_second=1450.0),
             event("error", 25, 2, message="CUDA error: an illegal memory access"),
             event("start", 30, 3, resumed_from_step=8, total_steps=44, total_tokens=44_000)]
    with Ledger(ledger_url) as ledger:
        job_id = ledger.create_job(make_spec(), spec_yaml(), "local", make_plan(), 1)
        events_path = tmp_path / "events.jsonl"
        events_path.touch()
        seen = []
        for line in [None, *lines]:
            if line is not None:
                write_events(events_path, [line])
                ledger.ingest_events(job_id, events_path)
            by_query = watch.read_progress(ledger.latest_progress(job_id, watch.THROUGHPUT_WINDOW))
            assert by_query == progress_from_every_row(ledger, job_id), line
            seen.append(by_query)
    assert seen[0] == watch.Progress()
    assert seen[13].tokens_per_second == 1002.0  # the window's median: one fast step moves nothing
    assert (seen[-1].step, seen[-1].tokens_per_second, seen[-1].started_attempts) == (12, 1475.0, frozenset({1, 2, 3}))


def test_a_tick_reports_the_latest_step_and_throughput_of_a_long_job(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        watcher, events_path, last_step = long_running_job(ledger, tmp_path, 1000)
        watcher.tick()
        recipe_logs_a_step(events_path, last_step + 1)
        tick = watcher.tick()
        assert tick.progress == progress_from_every_row(ledger, watcher.job_id)
        assert (tick.progress.step, tick.progress.tokens_per_second) == (last_step + 1, 1000.0)
        assert [a.n for a in tick.attempts] == [1, 2] and tick.job.status == "running"


# ---- cost per tick ----------------------------------------------------------------------------------

@contextlib.contextmanager
def rows_fetched():
    """Rows each ledger query returns (every read goes through an ORM Session)."""
    counts: list[int] = []

    def count(state):
        if not state.is_select:
            return None
        frozen = state.invoke_statement().freeze()
        counts.append(len(frozen().all()))
        return frozen()

    sa_event.listen(Session, "do_orm_execute", count)
    try:
        yield counts
    finally:
        sa_event.remove(Session, "do_orm_execute", count)


@contextlib.contextmanager
def sqlite_work(ledger: Ledger):
    """SQLite virtual-machine steps (in hundreds): the work queries do, whether or not it shows in
    the rows they return (a max() over every sample returns one row)."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    def on_execute(conn, *_):
        conn.connection.driver_connection.set_progress_handler(count, 100)

    sa_event.listen(ledger._engine, "before_cursor_execute", on_execute)
    try:
        yield steps
    finally:
        sa_event.remove(ledger._engine, "before_cursor_execute", on_execute)


def test_a_tick_on_a_10000_sample_job_fetches_at_most_a_throughput_window_of_rows(ledger_url, tmp_path):
    with Ledger(ledger_url) as ledger:
        watcher, events_path, last_step = long_running_job(ledger, tmp_path, 10_000)
        watcher.tick()
        recipe_logs_a_step(events_path, last_step + 1)
        with rows_fetched() as counts:
            tick = watcher.tick()
        assert tick.progress.step == last_step + 1
        assert counts and max(counts) <= watch.THROUGHPUT_WINDOW


def test_a_tick_on_a_10000_sample_job_does_the_sqlite_work_of_one_on_a_100_sample_job(tmp_path):
    work = {}
    for steps in (100, 10_000):
        (tmp_path / str(steps)).mkdir()
        with Ledger(f"sqlite:///{tmp_path / str(steps) / 'ledger.db'}") as ledger:
            watcher, events_path, last_step = long_running_job(ledger, tmp_path / str(steps), steps)
            watcher.tick()
            recipe_logs_a_step(events_path, last_step + 1)
            with sqlite_work(ledger) as vm_steps:
                watcher.tick()
            work[steps] = vm_steps[0]
    # A scan of the long job's samples would be ~100x; seeks into a deeper B-tree are one step each.
    assert work[10_000] <= 1.1 * work[100] + 5, work


# ---- what each tick's ingest derives, by seeks ----------------------------------------------------

def test_a_resumed_attempt_counts_its_tokens_from_the_latest_earlier_sample_at_its_resume_step(ledger_url, tmp_path):
    """Attempt 2 packs 500 more tokens than attempt 1 by the same step, so it shows whose sample was used."""
    runs = [(1, None, range(1, 21), 0), (2, 10, range(11, 26), 500), (3, 15, range(16, 31), 500), (4, 5, range(6, 9), 0)]
    lines = []
    for n, resumed, steps, extra in runs:
        lines.append(event("start", 100 * n, n, resumed_from_step=resumed))
        lines += [event("step", 100 * n + i, n, step=s, tokens=1000 * s + extra) for i, s in enumerate(steps, start=1)]
    with Ledger(ledger_url) as ledger:
        job_id = ledger.create_job(make_spec(), spec_yaml(), "local", make_plan(), 1)
        write_events(tmp_path / "events.jsonl", lines)
        ledger.ingest_events(job_id, tmp_path / "events.jsonl")
        for n in (1, 2, 3, 4):
            ledger.upsert_attempt(job_id, observed(n, 100 * n, 100 * n + 50, "preempted"))
        assert [a.tokens for a in ledger.attempts(job_id)] == [
            20_000,           # from nothing
            25_500 - 10_000,  # from step 10, which only attempt 1 logged
            30_500 - 15_500,  # from step 15, which attempts 1 and 2 both logged: the later one counts
            8_000 - 5_000,    # from step 5, which only attempt 1 logged, two attempts back
        ]
