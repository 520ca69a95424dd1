"""Tiny LoRA jobs and the `spotune` console script, for the fault tests: a spec the CPU trains in
seconds, the CLI run as a user runs it, and ways to wait for what a detached job leaves behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from contract.events import read_jsonl
from orchestrator.ledger import Ledger

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "recipes" / "sample_data" / "json_demo.jsonl"


def write_spec(directory: Path, name: str = "tiny-fault", **changes) -> Path:
    """A tiny LoRA spec; `changes` set dotted fields (train__max_steps=4, constraints={...})."""
    spec = {
        "name": name, "model": "tiny-llama", "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(DEMO_DATA), "format": "alpaca"},
        "seq_len": 256, "epochs": 1, "batch": {"micro": 1, "global": 1},
        "checkpoint": {"every_steps": 1, "every_minutes": None, "keep": 2},
        "train": {"max_steps": 4, "log_every_steps": 1, "seed": 1},
        "local": {"price_per_hour": 2.73},
    }
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            spec.setdefault(section, {})[key] = value
        else:
            spec[section] = value
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def spotune(state: Path, *args: str, env: Optional[dict] = None, db: Optional[str] = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """The console script's entry point, as a user runs it."""
    cmd = [sys.executable, "-c", "from orchestrator.cli import main; main()", "--state-dir", str(state)]
    if db is not None:
        cmd += ["--db", db]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def ledger_of(state: Path) -> Ledger:
    return Ledger(f"sqlite:///{state / 'ledger.db'}")


def the_job(ledger: Ledger):
    (job,) = ledger.list_jobs()
    return job


def events(run_dir: Path, name: Optional[str] = None) -> list[dict]:
    return [e for e in read_jsonl(Path(run_dir) / "events.jsonl") if name is None or e["event"] == name]


def supervisor_records(run_dir: Path, record: Optional[str] = None) -> list[dict]:
    return [r for r in read_jsonl(Path(run_dir) / "attempts.jsonl") if record is None or r["record"] == record]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]
