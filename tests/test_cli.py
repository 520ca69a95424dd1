"""CLI plumbing: the global options travel on Typer's context, one error boundary turns a UserError
from any command into one `error:` line and exit 2, and `--plot` without matplotlib says how to get it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from contract.errors import UserError
from orchestrator import __version__
from orchestrator.cli import app
from orchestrator.settings import GlobalOptions, global_options

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("plan", "catalog", "launch", "status", "logs", "cancel", "resume", "ledger", "calibrate")


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "160", **(env or {})})


def assert_one_error_line(result, message: str, exit_code: int = 2) -> None:
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    assert result.stderr.splitlines() == [message], result.stderr
    assert result.stdout == "" and "Traceback" not in result.output


# ---- the error boundary ---------------------------------------------------------------------------

def test_every_command_is_registered():
    assert sorted(c.name for c in app.registered_commands) == sorted(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_a_user_error_from_any_command_is_one_line_and_exit_2(monkeypatch, name):
    (command,) = [c for c in app.registered_commands if c.name == name]

    def fails() -> None:
        raise UserError(f"{name} cannot do that")

    monkeypatch.setattr(command, "callback", fails)
    assert_one_error_line(invoke(name), f"error: {name} cannot do that")


def test_a_user_errors_own_exit_code_is_kept(monkeypatch):
    class Refused(UserError):
        exit_code = 3

    def fails() -> None:
        raise Refused("not now")

    monkeypatch.setattr(app.registered_commands[0], "callback", fails)
    assert_one_error_line(invoke(app.registered_commands[0].name), "error: not now", exit_code=3)


def test_ctrl_c_that_no_command_handles_is_one_line_and_exit_130(monkeypatch):
    def interrupted() -> None:
        raise KeyboardInterrupt

    (command,) = [c for c in app.registered_commands if c.name == "status"]
    monkeypatch.setattr(command, "callback", interrupted)
    assert_one_error_line(invoke("status"), "interrupted", exit_code=130)


@pytest.mark.parametrize("args, message", [
    (("catalog", "--no-sky", "--gpu", "X100"), "error: unknown GPU 'X100'"),
    (("ledger", "--json", "--csv"), "error: --json and --csv are alternatives; give one"),
    (("status", "no-such-job"), "error: no job matching 'no-such-job' in the ledger"),
    (("logs", "no-such-job"), "error: no job matching 'no-such-job' in the ledger"),
    (("cancel", "no-such-job"), "error: no job matching 'no-such-job' in the ledger"),
    (("resume", "no-such-job"), "error: no job matching 'no-such-job' in the ledger"),
])
def test_real_user_errors_go_through_the_same_boundary(tmp_path, args, message):
    result = invoke("--state-dir", str(tmp_path / "state"), *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.output


def test_the_console_script_prints_the_error_line_and_no_traceback(tmp_path):
    spotune_bin = Path(sys.executable).parent / "spotune"
    done = subprocess.run([str(spotune_bin), "--state-dir", str(tmp_path), "catalog", "--no-sky", "--provider", "hetzner"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: unknown provider 'hetzner'") and done.stderr.count("\n") == 1, done.stderr


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"spotune {__version__}\n"


# ---- global options on the context -----------------------------------------------------------------

def test_state_dir_reaches_the_command_through_the_context(tmp_path):
    state = tmp_path / "state"
    result = invoke("--state-dir", str(state), "status")
    assert result.exit_code == 0, result.output
    # The command says which ledger it read, and reading creates nothing.
    assert f"ledger {state / 'ledger.db'}: not created yet" in result.stdout
    assert not state.exists()


def test_db_wins_over_the_state_dir(tmp_path):
    state, db = tmp_path / "state", tmp_path / "elsewhere.db"
    result = invoke("--state-dir", str(state), "--db", f"sqlite:///{db}", "status")
    assert result.exit_code == 0, result.output
    assert f"ledger {db}" in result.stdout and "state" not in result.stdout.replace(str(tmp_path), "")


def test_global_options_do_not_outlive_their_invocation(tmp_path):
    first, from_env = tmp_path / "first", tmp_path / "from-env"
    assert str(first) in invoke("--state-dir", str(first), "status").stdout
    # The next invocation gives no --state-dir: the environment decides, not what the last one said.
    result = invoke("status", env={"SPOTUNE_STATE_DIR": str(from_env), "SPOTUNE_DB": None})
    assert result.exit_code == 0, result.output
    assert f"ledger {from_env / 'ledger.db'}" in result.stdout


def test_python_dash_m_honours_the_global_options_too(tmp_path):
    # `python -m orchestrator.cli` loads cli.py twice (as __main__ and as orchestrator.cli): options
    # kept on the context, not on a module's class, reach the command either way.
    flagged = tmp_path / "flagged"
    env = {k: v for k, v in os.environ.items() if k not in ("SPOTUNE_DB", "SPOTUNE_STATE_DIR")}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "--state-dir", str(flagged), "status"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**env, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "ledger flagged/ledger.db" in done.stdout  # said relative to where it ran
    assert not flagged.exists() and not (tmp_path / "state").exists()


def test_global_options_resolve_flag_then_environment_then_default(tmp_path, monkeypatch):
    monkeypatch.delenv("SPOTUNE_DB", raising=False)
    monkeypatch.setenv("SPOTUNE_STATE_DIR", str(tmp_path / "env"))
    assert global_options().state_path() == tmp_path / "env"
    options = GlobalOptions(state_dir=str(tmp_path / "flag"))
    assert options.state_path() == tmp_path / "flag"
    assert options.db_url() == f"sqlite:///{(tmp_path / 'flag').resolve() / 'ledger.db'}"
    assert GlobalOptions(db="sqlite:///x.db").db_url() == "sqlite:///x.db"
    assert options.existing_ledger() is None and not (tmp_path / "flag").exists()


# ---- --plot is an extra -------------------------------------------------------------------------------

def test_plot_without_matplotlib_is_one_line_saying_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as when not installed
    png = tmp_path / "ledger.png"
    result = invoke("--state-dir", str(tmp_path / "state"), "ledger", "--plot", str(png))
    assert_one_error_line(result, "error: --plot needs matplotlib: pip install 'spotune[plot]'")
    assert not png.exists() and not (tmp_path / "state").exists()


def test_everything_but_plot_runs_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = invoke("--state-dir", str(tmp_path / "state"), "ledger", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["jobs"] == []
