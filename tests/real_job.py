"""One real tiny job, run once per test session through the CLI as a user runs it (the real local
backend, supervisor, recipe and SQLite ledger), shared by the tests that read a finished job: the
JSON schema, the HTML report, the checkpoint table, the loading phases in the log.

Import the fixture into a test module: `from real_job import finished_job  # noqa: F401`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

DEMO_DATA = Path(__file__).resolve().parents[1] / "recipes" / "sample_data" / "json_demo.jsonl"


def tiny_spec(directory: Path, name: str = "first-hour", **overrides) -> Path:
    """A LoRA job on the built-in tiny model that checkpoints every step and keeps two."""
    spec = {
        "name": name, "model": "tiny-llama", "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(DEMO_DATA), "format": "alpaca"},
        "seq_len": 256, "epochs": 1, "batch": {"micro": 1, "global": 1},
        "checkpoint": {"every_steps": 1, "keep": 2},
        "train": {"max_steps": 6, "log_every_steps": 1, "seed": 1},
        "local": {"price_per_hour": 2.73},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            spec.setdefault(key, {}).update(value)
        else:
            spec[key] = value
    path = Path(directory) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def spotune(state: Path, *args: str, timeout: float = 900, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The console script's entry point in a process of its own, as a user runs it."""
    command = [sys.executable, "-c", "from orchestrator.cli import main; main()", "--state-dir", str(state), *args]
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("SPOTUNE_DB", None)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@dataclass(frozen=True)
class FinishedJob:
    state: Path
    job_id: str
    run_dir: Path
    spec: Path


_CACHE: dict[str, FinishedJob] = {}


@pytest.fixture(scope="session")
def finished_job(tmp_path_factory) -> FinishedJob:
    """A 6-step job with a checkpoint after every step (2 kept), run to the end with `spotune launch`."""
    if "job" not in _CACHE:
        root = tmp_path_factory.mktemp("finished-job")
        state = root / "state"
        spec = tiny_spec(root)
        done = spotune(state, "launch", str(spec))
        assert done.returncode == 0, done.stdout + done.stderr
        (run_dir,) = (state / "runs").iterdir()
        _CACHE["job"] = FinishedJob(state, run_dir.name, run_dir, spec)
    return _CACHE["job"]
