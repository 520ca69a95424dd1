"""The control plane stays light: no torch, no sky at import or for --help."""
import subprocess
import sys

HEAVY = ("torch", "sky", "transformers", "ray", "peft", "bitsandbytes", "matplotlib")


def imported_after(code: str) -> set[str]:
    probe = code + "\nimport sys, json; print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    import json

    return set(json.loads(out.strip().splitlines()[-1]))


def test_import_orchestrator_imports_no_heavy_library():
    assert not imported_after("import orchestrator") & set(HEAVY)


def test_cli_help_imports_no_heavy_library():
    code = (
        "import sys\nsys.argv=['spotune','--help']\n"
        "from orchestrator.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
    )
    assert not imported_after(code) & set(HEAVY)


def test_every_command_has_help():
    from typer.testing import CliRunner

    from orchestrator.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("plan", "catalog", "launch", "status", "logs", "cancel", "resume", "ledger"):
        assert command in result.output, command
