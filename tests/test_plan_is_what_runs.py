"""The plan is what runs, end to end: a `batch.micro: auto` job planned and run on the local backend
(real tiny training), a GPU option rendered into the SkyPilot node spec, and the recipe run by hand
with and without an execution section."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sky_catalog import catalog_offers, seeded_runtime, sky_with_seeded_catalog
from typer.testing import CliRunner

from contract.events import read_jsonl
from contract.spec import load_spec, parse_spec
from launch.local import LocalBackend
from launch.sky_task import build_task
from orchestrator import jobs, watch
from orchestrator.ledger import Ledger
from orchestrator.planner import make_plan

sky_with_seeded_catalog()
DEMO_DATA = Path(__file__).resolve().parents[1] / "recipes" / "sample_data" / "json_demo.jsonl"
REPO = Path(__file__).resolve().parents[1]


def auto_spec(directory: Path, **changes) -> Path:
    """micro-batch and checkpointing left to the planner. With 16 sequences per step the planner
    (memory unchecked on the CPU) and the recipe's own fallback (at most 8 on the CPU) would choose
    differently, so a micro-batch of 16 on the node can only have come from the plan."""
    spec = {"name": "auto-micro", "model": "tiny-llama", "method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"path": str(DEMO_DATA), "format": "alpaca"}, "seq_len": 256,
            "batch": {"micro": "auto", "global": 16}, "checkpoint": {"every_steps": 100},
            "train": {"max_steps": 2, "log_every_steps": 1, "seed": 1, "gradient_checkpointing": "auto"},
            "local": {"price_per_hour": 1.0}, **changes}
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_a_local_run_trains_with_the_plans_micro_batch_and_checkpointing_and_the_ledger_says_so(tmp_path):
    spec_path = auto_spec(tmp_path)
    spec = load_spec(spec_path)
    backend = LocalBackend(restart_seconds=0)
    plan = jobs.make_job_plan(spec, backend)
    chosen = jobs.choose_option(plan, None)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    submitted = jobs.submit_job(ledger, spec_path, spec, backend, plan, chosen, tmp_path / "state")
    final = watch.Watcher(ledger, submitted.job_id, LocalBackend(), submitted.external_id, poll_seconds=0.3).watch(timeout=600)
    assert final.job.status == "succeeded"

    planned = (chosen.micro_batch, chosen.gradient_checkpointing)
    assert planned == (16, False)
    events = read_jsonl(submitted.run_dir / "events.jsonl")
    [start] = [e for e in events if e["event"] == "start"]
    assert (start["micro_batch"], start["gradient_checkpointing"], start["decided_by"]) == (*planned, "plan")
    assert (start["grad_accum"], start["dtype"], start["attention"]) == (chosen.grad_accum, chosen.execution.dtype, "sdpa")
    assert not [e for e in events if e["event"] == "deviation"]
    estimate, [attempt] = ledger.get_job(submitted.job_id).estimate, ledger.attempts(submitted.job_id)
    assert (estimate.micro_batch, estimate.gradient_checkpointing) == planned
    assert (attempt.micro_batch, attempt.gradient_checkpointing, attempt.grad_accum) == (*planned, chosen.grad_accum)

    from orchestrator.cli import app

    result = CliRunner().invoke(app, ["--db", f"sqlite:///{tmp_path / 'ledger.db'}", "ledger", submitted.job_id, "--json"])
    assert result.exit_code == 0, result.output
    [job] = json.loads(result.stdout)["jobs"]
    assert (job["estimate"]["micro_batch"], job["estimate"]["gradient_checkpointing"]) == planned
    assert [(a["micro_batch"], a["gradient_checkpointing"]) for a in job["attempts"]] == [planned]


def test_a_planned_gpu_option_reaches_the_skypilot_node_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("SKY_RUNTIME_DIR", seeded_runtime())
    spec_path = auto_spec(tmp_path, model="meta-llama/Llama-3.1-8B", method="qlora", seq_len=2048,
                          batch={"micro": "auto", "global": 32}, train={"gradient_checkpointing": "auto"})
    spec = load_spec(spec_path)
    plan = make_plan(spec, catalog_offers())
    chosen = next(o for o in plan.options if o.offer.gpu_count == 1)
    task, _ = build_task(jobs.launch_request("auto-micro-1", spec, plan, chosen, tmp_path / "state"))

    node = parse_spec(yaml.safe_load(task.envs["SPOTUNE_SPEC_YAML"]), for_training=True)
    assert node.execution == chosen.execution
    assert (node.execution.micro_batch, node.execution.gradient_checkpointing, node.execution.gpu) == (
        chosen.micro_batch, chosen.gradient_checkpointing, chosen.offer.gpu)
    assert node.data.path == "/spotune-data/json_demo.jsonl"   # only the data path moved


def run_recipe(spec_path: Path, run_dir: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "recipes.sft", str(spec_path), "--run-dir", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return read_jsonl(run_dir / "events.jsonl")


@pytest.mark.slow
def test_by_hand_the_recipe_decides_once_itself_and_with_a_plan_never_re_decides(tmp_path):
    fallback = run_recipe(auto_spec(tmp_path), tmp_path / "fallback")
    [start] = [e for e in fallback if e["event"] == "start"]
    assert (start["micro_batch"], start["decided_by"], start["dtype"]) == (8, "recipe", "float32")

    pinned = {"gpu": "CPU", "gpu_count": 1, "micro_batch": 2, "grad_accum": 8, "gradient_checkpointing": True,
              "dtype": "float32", "sharding": "none"}
    (tmp_path / "pinned").mkdir()
    events = run_recipe(auto_spec(tmp_path / "pinned", execution=pinned), tmp_path / "pinned" / "run")
    [start] = [e for e in events if e["event"] == "start"]
    assert {k: start[k] for k in ("micro_batch", "grad_accum", "gradient_checkpointing", "dtype", "decided_by")} == {
        "micro_batch": 2, "grad_accum": 8, "gradient_checkpointing": True, "dtype": "float32", "decided_by": "plan"}
    assert not [e for e in events if e["event"] == "deviation"]

    # Planned for a GPU, run here: each difference is a deviation logged before the start it explains.
    (tmp_path / "gpu").mkdir()
    planned = {**pinned, "gpu": "H100", "dtype": "bfloat16", "needs_free_gib": 30.0, "activations_gib": 20.0}
    events = run_recipe(auto_spec(tmp_path / "gpu", execution=planned), tmp_path / "gpu" / "run")
    kinds = [(e["event"], e.get("kind")) for e in events if e["event"] in ("deviation", "start")]
    assert kinds == [("deviation", "device"), ("deviation", "dtype"), ("start", None)]
    [start] = [e for e in events if e["event"] == "start"]
    assert (start["micro_batch"], start["gradient_checkpointing"], start["dtype"]) == (2, True, "float32")
