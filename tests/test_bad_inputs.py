"""Every bad input is refused: exit 2, one `error:` line that says why, no traceback, no hang, and
no ledger row but a failed job stating why (issue 11). The corpus is tests/bad_inputs.py.

- `plan` runs the whole corpus in-process through Typer's CliRunner, except the hazards (inputs
  that hang or eat memory when their guard is missing: FIFOs, /dev/zero, deep nesting), which run
  as a subprocess with a timeout; a sample also runs through the `spotune` console script.
- `launch` (local backend) runs the same way on the cases that reach it.
- `python -m recipes.sft` runs a sample of each kind as a subprocess.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bad_inputs import DANGLING_LINK, DIRECTORY, FIFO, SECRET, SEED, SOCKET, SYMLINK_LOOP, Case, corpus, spec_text
from orchestrator.cli import app

ROOT = Path(__file__).resolve().parents[1]
HANG_SECONDS = 10
CORPUS = corpus()


def _stratified(cases: list[Case], n: int, seed: int = SEED) -> list[Case]:
    """About n cases, every kind represented in proportion, hazards first in line: always the same ones."""
    by_kind = defaultdict(list)
    for case in cases:
        by_kind[case.kind].append(case)
    rng, picked = random.Random(seed), []
    for kind, members in sorted(by_kind.items()):
        k = min(len(members), max(2, round(n * len(members) / len(cases))))
        hazards = [c for c in members if c.hazard]
        rest = [c for c in members if not c.hazard]
        chosen = rng.sample(hazards, min(len(hazards), (k + 1) // 2))
        picked += chosen + rng.sample(rest, min(len(rest), k - len(chosen)))
    return picked


PLAN = [c for c in CORPUS if c.plan is not None and c.command is None]
LAUNCH = [c for c in CORPUS if c.launch is not None and c.command is None]
OTHER = [c for c in CORPUS if c.command is not None]
# The recipe refuses a bad spec before it imports torch (a fraction of a second); data and model
# problems only after torch, transformers and the tokenizer load (seconds each): three of those.
NODE_LEVEL = ("seq_len-past-context", "data-nested-list-100k", "data-fifo")
RECIPE = (_stratified([c for c in CORPUS if c.recipe is not None and c.kind != "data"
                       and not c.id.startswith(("data-", "seq_len-"))], 30)
          + [c for c in CORPUS if c.id in NODE_LEVEL])
CONSOLE = _stratified(PLAN, 16, seed=SEED + 1)


def _ids(cases):
    return [c.id[:80] for c in cases]


# ---- putting a case on disk and running it -----------------------------------------------------

def materialize(case: Case, where: Path) -> Path:
    for name, content in case.file_map().items():
        path = where / name
        if content == FIFO:
            os.mkfifo(path)
        elif content == DIRECTORY:
            path.mkdir()
        elif content == SOCKET:
            os.mknod(path, 0o600 | stat.S_IFSOCK)   # a socket file without binding one (AF_UNIX paths are short)
        elif content == SYMLINK_LOOP:
            path.symlink_to(name)
        elif content == DANGLING_LINK:
            path.symlink_to("missing-target")
        else:
            path.write_bytes(content)
    return where


def _fill(arg: str, where: Path) -> str:
    return arg.replace("{dir}", str(where))


def command_line(case: Case, command: str, where: Path) -> list[str]:
    """The arguments after `spotune` (or after `python -m recipes.sft`)."""
    spec = _fill(case.spec, where)
    if command == "plan":
        return [*map(lambda a: _fill(a, where), case.before), "plan", spec, *(_fill(a, where) for a in case.plan)]
    if command == "launch":
        before = [_fill(a, where) for a in case.before]
        if "--state-dir" not in case.before:
            before = ["--state-dir", str(where / "state"), *before]
        return [*before, "launch", spec, "--backend", "local", "--detach", *(_fill(a, where) for a in case.launch)]
    if command == "recipe":
        return [spec, "--run-dir", str(where / "run"), *(_fill(a, where) for a in case.recipe)]
    return ["--state-dir", str(where / "state"), *(_fill(a, where) for a in case.command)]


def run_in_process(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # the boundary let something through: show its traceback here
    return result.exit_code, result.stdout, result.stderr


def run_process(argv: list[str], timeout: float = HANG_SECONDS) -> tuple[int, str, str]:
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              env={**os.environ, "COLUMNS": "160"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: {argv[:4]}...")
    return done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")


def spotune_script() -> str:
    found = shutil.which("spotune", path=str(Path(sys.executable).parent)) or shutil.which("spotune")
    assert found, "the spotune console script is not installed (pip install -e .)"
    return found


def assert_refused(case: Case, code: int, stdout: str, stderr: str, *, only_line: bool = True) -> None:
    """Exit 2; exactly one `error: ...` line, on stderr, saying what the case is about. `spotune`
    prints nothing else; the recipe may have logged its loading phases before it (only_line=False)."""
    where = f"[{case.id}] exit {code}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-2000:]}"
    assert "Traceback" not in stdout + stderr, where
    assert SECRET not in stdout + stderr, where
    lines = [line for line in stderr.splitlines() if line.strip()]
    if not only_line:
        lines = [line for line in lines if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: "), where
    if only_line:
        assert stdout.strip() == "", where
    else:  # the recipe's loading-phase log lines, and nothing else
        assert all(re.match(r"\[ *[0-9.]+ s\] ", line) for line in stdout.splitlines() if line.strip()), where
    assert code == 2, where
    assert re.search(case.expect, lines[0]), f"{where}\nexpected to match: {case.expect}"


def assert_no_ledger_row_but_failed_ones(state: Path) -> None:
    ledger = state / "ledger.db"
    if ledger.exists():
        with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT id, status, failure_reason FROM jobs").fetchall()
        assert all(status == "failed" and reason for _, status, reason in rows), rows
        if rows:
            return
    runs = state / "runs"
    assert not runs.exists() or not any(runs.iterdir()), f"a run was started: {list(runs.iterdir())}"


@pytest.fixture
def case_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(tmp_path / "no-sky"))  # bundled prices only: no user catalog
    monkeypatch.delenv("SPOTUNE_DB", raising=False)
    monkeypatch.delenv("SPOTUNE_STATE_DIR", raising=False)
    where = tmp_path / "case"
    where.mkdir()
    return where


# ---- the harness itself: its base case is accepted, so refusals are the cases' doing ---------

def test_the_base_spec_plans_and_dry_runs_so_every_refusal_is_the_case(case_dir):
    materialize(Case("base", "control", ""), case_dir)
    code, out, err = run_in_process(["plan", str(case_dir / "spec.yaml")])
    assert code == 0, err
    code, out, err = run_in_process(["--state-dir", str(case_dir / "state"), "launch", str(case_dir / "spec.yaml"), "--dry-run"])
    assert code == 0, err
    assert not (case_dir / "state").exists()


def test_the_corpus_is_large_seeded_and_covers_every_class():
    kinds = {c.kind for c in CORPUS}
    assert len(CORPUS) >= 300
    assert kinds == {"encoding", "number", "name", "special-file", "data", "structure", "flag"}
    assert [c.id for c in corpus()] == [c.id for c in CORPUS] and corpus()[0].files == CORPUS[0].files
    assert {c.kind for c in RECIPE} == kinds and {c.kind for c in CONSOLE} <= kinds and len(CONSOLE) >= 12
    # The named inputs are all in it.
    ids = {c.id for c in CORPUS}
    for named in ("random-bytes-00", "latin-1-0", "utf-16", "gzip-1", "epochs=.inf", "constraints.budget=.inf",
                  "local.price_per_hour=.inf", "spec-proc-self-mem", "data-nested-list-100k", "spec-fifo", "data-fifo",
                  "spec-dev-zero", "data-dev-zero", "constraints-gpus-100k", "global--db=text-file",
                  "launch--poll-seconds=-1", "launch--restart-seconds=nan", "plan--top=0", "plan--top=-1",
                  "plan--top=abc", "model-newline", "seq_len-past-context", "batch.global=1.0e+30",
                  f"train.seed={2**70}", "name-100k", "model-long-component"):
        assert named in ids, named


# ---- the corpus ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", PLAN, ids=_ids(PLAN))
def test_plan_refuses(case, case_dir):
    materialize(case, case_dir)
    args = command_line(case, "plan", case_dir)
    if case.hazard:
        assert_refused(case, *run_process([sys.executable, "-m", "orchestrator", *args]))
    else:
        assert_refused(case, *run_in_process(args))


@pytest.mark.parametrize("case", CONSOLE, ids=_ids(CONSOLE))
def test_plan_refuses_through_the_console_script(case, case_dir):
    materialize(case, case_dir)
    assert_refused(case, *run_process([spotune_script(), *command_line(case, "plan", case_dir)]))


@pytest.fixture
def stop_what_started(case_dir):
    """A case launch wrongly accepted is a failure, and its detached run must not outlive the test."""
    yield
    from launch.local import LocalBackend

    runs = case_dir / "state" / "runs"
    for run_dir in (runs.iterdir() if runs.exists() else ()):
        LocalBackend(case_dir / "state").cancel(str(run_dir), graceful=False)


@pytest.mark.parametrize("case", LAUNCH, ids=_ids(LAUNCH))
def test_launch_refuses_and_records_nothing(case, case_dir, stop_what_started):
    materialize(case, case_dir)
    args = command_line(case, "launch", case_dir)
    if case.hazard:
        assert_refused(case, *run_process([sys.executable, "-m", "orchestrator", *args]))
    else:
        assert_refused(case, *run_in_process(args))
    assert_no_ledger_row_but_failed_ones(case_dir / "state")


@pytest.mark.parametrize("case", OTHER, ids=_ids(OTHER))
def test_other_commands_refuse(case, case_dir):
    materialize(case, case_dir)
    assert_refused(case, *run_in_process(command_line(case, "other", case_dir)))
    assert not (case_dir / "state" / "ledger.db").exists()


@pytest.mark.parametrize("case", RECIPE, ids=_ids(RECIPE))
def test_recipe_refuses_and_writes_no_checkpoint(case, case_dir, recipe_start_seconds):
    materialize(case, case_dir)
    argv = [sys.executable, "-m", "recipes.sft", *command_line(case, "recipe", case_dir)]
    # The recipe loads torch and transformers before it reads the data: that start-up is not a hang,
    # and on a loaded machine it varies from one process to the next, hence the margin on it.
    assert_refused(case, *run_process(argv, timeout=HANG_SECONDS + 3 * recipe_start_seconds), only_line=False)
    checkpoints = case_dir / "run" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


@pytest.fixture(scope="module")
def recipe_start_seconds():
    """How long importing the recipe's trainer takes on this machine right now (torch, transformers)."""
    import time

    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import recipes.trainer"], cwd=ROOT, check=True, timeout=300)
    return time.monotonic() - started


# ---- a few the corpus cannot say by regex alone -----------------------------------------------

def test_an_unexpected_exception_is_one_internal_line_and_the_trace_goes_to_the_state_dir(case_dir, monkeypatch):
    import orchestrator.planner

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug\nthat spans lines with HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz")

    monkeypatch.setattr(orchestrator.planner, "make_plan", broken)
    # As SkyPilot leaves it after one of its errors (sky/utils/ux_utils.py): the trace keeps its frames.
    monkeypatch.setattr(sys, "tracebacklimit", 0, raising=False)
    materialize(Case("base", "control", ""), case_dir)
    state = case_dir / "state"
    code, out, err = run_in_process(["--state-dir", str(state), "plan", str(case_dir / "spec.yaml")])
    assert code == 1 and out == ""
    [line] = err.splitlines()
    assert line.startswith("error: internal: ZeroDivisionError: a bug\\nthat spans lines with HF_TOKEN=*** (full trace: ")
    [trace] = (state / "logs").glob("internal-*.log")
    assert line.endswith(f"(full trace: {trace})")
    text = trace.read_text()
    assert "Traceback" in text and "ZeroDivisionError" in text and "hf_abcdefghijklmnopqrstuvwxyz" not in text


def test_an_error_message_cannot_repaint_the_terminal(case_dir):
    (case_dir / "spec.yaml").write_text(spec_text(model='"tiny-\\e[2J-llama"'))
    code, out, err = run_in_process(["plan", str(case_dir / "spec.yaml")])
    assert code == 2 and "\x1b" not in err


def test_the_longest_model_and_run_dir_the_spec_allows_fit_the_ledger(ledger_url):
    """PostgreSQL enforces VARCHAR lengths where SQLite does not: what validation accepts, the ledger stores."""
    from contract.files import MAX_PATH_BYTES
    from contract.spec import parse_spec
    from ledger_factory import make_plan
    from orchestrator.ledger import Ledger

    model = ("/" + "/".join(["m" * 254] * 17))[:MAX_PATH_BYTES]
    spec = parse_spec({"name": "long", "model": model, "method": "lora",
                       "data": {"examples": 10, "tokens_per_example": 10}})
    run_dir = "/state" + "/runs" * 400
    with Ledger(ledger_url) as ledger:
        job_id = ledger.create_job(spec, "name: long\n", "local", make_plan(job="long"), 1)
        ledger.set_external_id(job_id, run_dir)
        job = ledger.get_job(job_id)
    assert (len(job.model.encode()), job.model, job.external_id) == (MAX_PATH_BYTES, model, run_dir)


def test_an_option_the_ledger_could_not_record_is_refused_before_anything_starts(ledger_url):
    """NUMERIC(18, 6) holds under $10^12: such an estimate would fail on PostgreSQL inside the launch."""
    from contract.errors import UserError
    from ledger_factory import make_option, make_plan
    from orchestrator.jobs import choose_option
    from orchestrator.ledger import Ledger

    recordable = make_option(rank=1, expected_cost="999999999999.999999")
    too_much = make_option(rank=2, expected_cost="1000000000000")
    plan = make_plan(recordable, too_much)
    with pytest.raises(UserError, match=r"option 2 would cost \$1\.000e\+12, more than the ledger can record"):
        choose_option(plan, 2)
    with Ledger(ledger_url) as ledger:  # the largest it accepts is stored to the last digit
        from ledger_factory import make_spec

        job_id = ledger.create_job(make_spec(), "name: demo\n", "local", plan, choose_option(plan, 1).rank)
        assert ledger.get_job(job_id).estimate.expected_cost == recordable.expected_cost
