"""The README is the front door: its two set-up commands stay true."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up\n.*?```(?:bash)?\n(.*?)```", readme, re.S)
    assert block, "README has a '## Set up' section with a code block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands():
    assert len(setup_commands()) == 2


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = setup_commands()[1]
    assert "pytest" in test_command
    assert test_command in ci.splitlines()


def test_main_command_runs_a_spec_that_exists():
    main = setup_commands()[0]
    spec = re.search(r"spotune launch (\S+\.yaml)", main)
    assert spec and (ROOT / spec.group(1)).exists()
