"""Every command that prints a table prints JSON with `--json`, and what it prints is what
docs/spotune.schema.json (documented in docs/json.md) says: one schema, checked command by command."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from ledger_factory import hand_example
from real_job import finished_job, spotune  # noqa: F401  (finished_job is a fixture)

from orchestrator.cli import app
from orchestrator.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "spotune.schema.json").read_text())
TINY_DEMO = ROOT / "recipes" / "configs" / "tiny-demo.yaml"
SUPPORT_BOT = ROOT / "examples" / "llama8b-qlora.yaml"


def validate(kind: str, document) -> None:
    """`document` against the schema's definition for one command's output."""
    validator = Draft202012Validator({**SCHEMA, "$ref": f"#/$defs/{kind}"})
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


def invoke_json(*args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "160", "HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_schema_is_valid_and_its_job_statuses_are_the_ledgers():
    from orchestrator.ledger_tables import JOB_STATUSES

    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$defs"]["job_status"]["enum"] == list(JOB_STATUSES)
    documented = (ROOT / "docs" / "json.md").read_text()
    for kind in ("status", "status_job", "event", "catalog", "plan", "ledger"):
        assert f"#/$defs/{kind}`" in documented


@pytest.fixture
def seeded(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger(url) as ledger:
        job_id = hand_example(ledger, tmp_path)
    return url, job_id


def test_status_json(seeded, tmp_path):
    url, job_id = seeded
    document = invoke_json("--db", url, "status", "--json")
    validate("status", document)
    assert [j["id"] for j in document["jobs"]] == [job_id]
    validate("status", invoke_json("--state-dir", str(tmp_path / "none"), "status", "--json"))


def test_ledger_json_all_jobs_and_one(seeded):
    url, job_id = seeded
    validate("ledger", invoke_json("--db", url, "ledger", "--json"))
    one = invoke_json("--db", url, "ledger", job_id, "--json")
    validate("ledger", one)
    assert [j["id"] for j in one["jobs"]] == [job_id]


def test_catalog_json():
    document = invoke_json("catalog", "--no-sky", "--gpu", "H100", "--json")
    validate("catalog", document)
    assert document["offers"]


def test_plan_json_and_plan_diff_json(tmp_path):
    validate("plan", invoke_json("plan", str(SUPPORT_BOT), "--json"))
    double = tmp_path / "six-epochs.yaml"
    double.write_text(SUPPORT_BOT.read_text().replace("epochs: 3", "epochs: 6"))
    with_diff = invoke_json("plan", str(SUPPORT_BOT), "--diff", str(double), "--json")
    validate("plan", with_diff)
    assert "diff" in with_diff


@pytest.mark.slow
def test_status_of_one_job_and_its_events_as_json(finished_job):
    done = spotune(finished_job.state, "status", finished_job.job_id, "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    validate("status_job", document)
    assert document["job"]["status"] == "succeeded" and len(document["job"]["checkpoints"]) == 2

    events = spotune(finished_job.state, "logs", finished_job.job_id, "--json")
    assert events.returncode == 0, events.stderr
    lines = [json.loads(line) for line in events.stdout.splitlines()]
    for event in lines:
        validate("event", event)
    kinds = [e["event"] for e in lines]
    assert kinds[0] == "start" and kinds[-1] == "finished" and kinds.count("step") == 6
