"""Fail fast on the laptop (what the recipe would refuse with exit 2 never starts a node), and say at
the end where the trained output is."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from ledger_factory import event, make_option, make_plan, make_spec, spec_yaml, write_events
from typer.testing import CliRunner

from contract.errors import UserError
from contract.spec import load_spec
from orchestrator.commands.jobs import output_location
from orchestrator.jobs import JobError, check_training_input


def write_spec(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"name": "demo", "model": "tiny-llama", "method": "lora", "data": data}))
    return path


def test_a_spec_without_a_dataset_file_is_refused_before_anything_starts(tmp_path):
    spec = load_spec(write_spec(tmp_path, {"examples": 100, "tokens_per_example": 128}))
    with pytest.raises(JobError, match=r"missing field 'data.path': training needs a dataset file"):
        check_training_input(spec)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "data file not found"),
    (lambda p: p.mkdir(), "is a directory, not a regular file"),
    (lambda p: os.mkfifo(p), "is a FIFO (named pipe), not a regular file"),
])
def test_a_dataset_that_is_not_a_readable_file_is_refused(tmp_path, make, message):
    make(tmp_path / "train.jsonl")
    spec = load_spec(write_spec(tmp_path, {"path": "train.jsonl"}))
    with pytest.raises(UserError, match=re.escape(message)):
        check_training_input(spec)


def test_launch_refuses_it_in_one_line_with_exit_2_and_writes_nothing(tmp_path):
    from orchestrator.cli import app

    spec = write_spec(tmp_path, {"path": "missing.jsonl"})
    result = CliRunner().invoke(app, ["--state-dir", str(tmp_path / "state"), "launch", str(spec), "--dry-run"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: data file not found: {tmp_path / 'missing.jsonl'}"]
    assert not (tmp_path / "state").exists()


def test_the_output_location_is_what_the_recipes_finished_event_says(tmp_path, ledger_url):
    from orchestrator.ledger import Ledger

    ledger = Ledger(ledger_url)
    job_id = ledger.create_job(make_spec(), spec_yaml(), "skypilot", make_plan(make_option()), 1)
    assert output_location(ledger, job_id) is None
    events = tmp_path / "events.jsonl"
    write_events(events, [event("start", 1, 1, resumed_from_step=None),
                          event("finished", 50, 1, step=9, tokens=9000, final_loss=1.5, train_seconds=2900.0,
                                output_path=f"s3://spotune-ckpt-{job_id}/{job_id}/output")])
    ledger.ingest_events(job_id, events)
    assert output_location(ledger, job_id) == f"s3://spotune-ckpt-{job_id}/{job_id}/output"
