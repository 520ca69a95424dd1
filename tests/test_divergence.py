"""A loss that goes NaN is not a success: the job ends `failed: diverged at step N` at once (no retry),
no checkpoint holds non-finite weights, and the last finite one is kept."""
from __future__ import annotations


import pytest
from tiny_jobs import events, write_spec

from launch.local import LocalBackend
from orchestrator import jobs, watch
from orchestrator.ledger import Ledger
from contract.spec import load_spec

pytestmark = pytest.mark.slow


def test_a_learning_rate_that_blows_up_the_tiny_model_fails_the_job_as_diverged(tmp_path):
    torch = pytest.importorskip("torch")
    # lr 10 with no clipping sends the adapter weights to inf within a few steps.
    spec_path = write_spec(tmp_path, "tiny-diverge", train={"lr": 10.0, "max_grad_norm": None, "scheduler": "constant",
                                                            "warmup_ratio": 0.0, "max_steps": 12, "seed": 1},
                           checkpoint__every_steps=2)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    spec = load_spec(spec_path)
    backend = LocalBackend(restart_seconds=0)
    plan = jobs.make_job_plan(spec, backend)
    submitted = jobs.submit_job(ledger, spec_path, spec, backend, plan, jobs.choose_option(plan, None), tmp_path / "state")
    final = watch.Watcher(ledger, submitted.job_id, backend, submitted.external_id, poll_seconds=0.3).watch(timeout=900)

    (diverged,) = events(submitted.run_dir, "diverged")
    step = diverged["step"]
    assert final.job.status == "failed"
    assert final.job.failure_reason.startswith(f"diverged at step {step} ")
    assert [a.end_reason for a in ledger.attempts(submitted.job_id)] == ["failed"]  # never retried
    assert not events(submitted.run_dir, "finished") and not (submitted.run_dir / "output").exists()

    kept = sorted((submitted.run_dir / "checkpoints").glob("step-*"))
    assert kept and diverged["checkpoint_step"] == int(kept[-1].name.removeprefix("step-")) < step
    for checkpoint in kept:
        weights = torch.load(checkpoint / "model.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in weights.values()), checkpoint.name

    log = (submitted.run_dir / "logs" / "attempt-1.log").read_text()
    assert "Traceback" not in log
    assert [line for line in log.splitlines() if line.startswith("error:")] == [f"error: {diverged['message']}"]
