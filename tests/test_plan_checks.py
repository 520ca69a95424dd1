"""`spotune plan` checks what launch will check: data format, constraint names, and the option that
`launch --backend B` runs (the local one with its start-up line)."""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.estimate import load_calibration

REPO = Path(__file__).resolve().parents[1]
DEMO_SPEC = REPO / "recipes" / "configs" / "tiny-demo.yaml"
SPEC = """name: checks
model: tiny-llama
method: lora
data: {path: data.jsonl}
seq_len: 256
"""


def run(*args: str, state: Path):
    return CliRunner().invoke(app, ["--state-dir", str(state), *args], env={"COLUMNS": "400"})


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("records, where, what", [
    ([{"question": "2+2?", "answer": "4"}], ":1:", "cannot detect the format"),
    ([{"instruction": "a", "output": "b"}, {"question": "2+2?", "answer": "4"}], ":2:", "field 'instruction' is missing"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], ":1:", "no assistant message"),
    ([{"instruction": "a", "output": "b" * 400}], ":1:", "longer than seq_len 256"),
])
def test_a_dataset_the_recipe_would_reject_fails_at_plan_with_file_and_line(tmp_path, records, where, what):
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "spec.yaml").write_text(SPEC)
    line = one_error_line(run("plan", str(tmp_path / "spec.yaml"), state=tmp_path / "state"))
    assert f"data.jsonl{where}" in line and what in line
    assert not (tmp_path / "state").exists()   # nothing written


@pytest.mark.parametrize("constraint, named, known", [
    ("gpus: [H100, A100-90GB]", "unknown GPU 'A100-90GB'", "A100-80GB"),
    ("providers: [awz]", "unknown provider 'awz'", "aws"),
])
def test_unknown_gpu_and_provider_names_are_errors_naming_the_known_ones(tmp_path, constraint, named, known):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("data: {path: data.jsonl}", "data: {examples: 100, tokens_per_example: 100}")
                    + f"constraints:\n  {constraint}\n")
    line = one_error_line(run("plan", str(spec), state=tmp_path / "state"))
    assert named in line and known in line


def test_a_gpu_family_name_still_stands_for_its_variants(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("data: {path: data.jsonl}", "data: {examples: 100, tokens_per_example: 100}")
                    + "constraints:\n  gpus: [A100]\n")
    result = run("plan", str(spec), "--json", state=tmp_path / "state")
    assert result.exit_code == 0, result.output
    assert {o["gpu"] for o in json.loads(result.output)["options"]} <= {"A100", "A100-80GB", "A100-80GB-SXM"}


def test_plan_for_the_local_backend_shows_the_option_launch_runs_with_a_start_up_line(tmp_path):
    result = run("plan", str(DEMO_SPEC), "--backend", "local", "--json", state=tmp_path / "state")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    (option,) = plan["options"]
    assert (plan["backend"], option["provider"], option["region"], option["spot"]) == ("local", "local", "this-machine", False)
    lines = {line["item"]: line for line in option["lines"]}
    assert set(lines) >= {"training", "start-up"}
    startup = load_calibration().overheads.local_startup
    assert f"{startup.seconds:.1f} s" in lines["start-up"]["formula"]
    assert Decimal(option["expected_cost"]) == sum(Decimal(line["amount"]) for line in option["lines"])


def test_launchs_plan_line_is_the_line_plan_shows_for_that_backend(tmp_path):
    planned = run("plan", str(DEMO_SPEC), "--backend", "local", state=tmp_path / "state")
    launched = run("launch", str(DEMO_SPEC), "--backend", "local", "--dry-run", state=tmp_path / "state")
    assert planned.exit_code == 0 and launched.exit_code == 0, planned.output + launched.output
    shown = planned.output.split("would run: ", 1)[1].splitlines()[0].strip()
    launch_line = next(line for line in launched.output.splitlines() if line.startswith("plan "))
    assert launch_line == f"plan {shown}"
    assert "local/this-machine" in shown and "expected $" in shown


def test_without_a_backend_plan_ranks_the_catalog_and_price_per_hour_needs_one(tmp_path):
    ranked = run("plan", str(DEMO_SPEC), "--json", state=tmp_path / "state")
    assert ranked.exit_code == 0 and len(json.loads(ranked.output)["options"]) > 1
    line = one_error_line(run("plan", str(DEMO_SPEC), "--price-per-hour", "1", state=tmp_path / "state"))
    assert "--backend local or ray" in line
