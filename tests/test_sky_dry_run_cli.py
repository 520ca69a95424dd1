"""`spotune launch SPEC --backend skypilot --dry-run > task.yaml`, as a user runs it: the file holds
the task YAML alone, SkyPilot's own loader accepts it, and every resource in it can run the task
on a cloud `sky check` enabled. The catalogs are the seeded excerpts (no network), where the
cheapest offers for this job are on Vast and RunPod."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sky_catalog import seeded_runtime, sky_with_seeded_catalog

sky = sky_with_seeded_catalog()
REPO = Path(__file__).resolve().parents[1]
SECRET = "do-not-leak-7c1e"


@pytest.fixture
def enabled(monkeypatch):
    from sky import global_user_state, skypilot_config
    from sky.clouds.cloud import CloudCapability

    monkeypatch.setenv("SKY_RUNTIME_DIR", seeded_runtime())
    workspace = skypilot_config.get_active_workspace()
    before = {c: [str(x) for x in global_user_state.get_cached_enabled_clouds(c, workspace)] for c in CloudCapability}
    global_user_state.set_enabled_clouds(["AWS", "GCP", "Lambda", "RunPod", "Vast"], CloudCapability.COMPUTE, workspace)
    global_user_state.set_enabled_clouds(["AWS", "GCP"], CloudCapability.STORAGE, workspace)
    yield
    for capability, clouds in before.items():
        global_user_state.set_enabled_clouds(clouds, capability, workspace)


def write_spec(directory: Path, name: str = "8b-qlora") -> Path:
    (directory / "data").mkdir()
    (directory / "data" / "train.jsonl").write_text(
        "".join(f'{{"instruction": "Say hi {i}", "output": "hello there, friend"}}\n' for i in range(50)))
    spec = {"name": name, "model": "meta-llama/Llama-3.1-8B", "method": "qlora", "seq_len": 512,
            "data": {"path": "data/train.jsonl"},
            "sky": {"secrets": ["HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]}}
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def dry_run(tmp_path: Path, spec: Path, **env) -> tuple[subprocess.CompletedProcess, Path]:
    task_yaml = tmp_path / "task.yaml"
    with open(task_yaml, "w") as out:
        done = subprocess.run([sys.executable, "-m", "orchestrator", "--state-dir", str(tmp_path / "state"), "launch",
                               str(spec), "--backend", "skypilot", "--dry-run"],
                              stdout=out, stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO), "SKY_RUNTIME_DIR": seeded_runtime(), **env})
    return done, task_yaml


def test_the_dry_run_file_is_a_task_skypilot_accepts_and_every_resource_can_run_it(tmp_path, enabled):
    done, task_yaml = dry_run(tmp_path, write_spec(tmp_path), AWS_ACCESS_KEY_ID="AKIAEXAMPLE",
                              AWS_SECRET_ACCESS_KEY=SECRET, HF_TOKEN="hf_" + SECRET)
    assert done.returncode == 0, done.stderr
    text = task_yaml.read_text()
    assert text.startswith("# spotune job 8b-qlora-dry-run: SkyPilot managed-job task")
    assert "option 1 of" in done.stderr and "dry run: would record" in done.stderr  # the plan: on stderr only
    assert "option 1 of" not in text and "would record" not in text
    task = sky.Task.from_yaml(str(task_yaml))  # SkyPilot's own file loader and schema validation
    features = task.get_required_cloud_features()
    for r in task.resources:
        r.cloud.check_features_are_supported(r, features | r.get_required_cloud_features())
    assert str(task.resources[0].cloud) in ("Vast", "RunPod")  # the cheapest, although it cannot mount a bucket
    assert {str(r.cloud).lower() for r in task.resources} <= {"aws", "gcp", "lambda", "runpod", "vast"}
    assert SECRET not in text and SECRET not in done.stderr
    assert task.name == "job-8b-qlora-dry-run"  # a spec name starting with a digit, made a valid cluster name


def test_without_the_stores_credentials_the_dry_run_says_why_vast_and_runpod_are_left_out(tmp_path, enabled):
    done, task_yaml = dry_run(tmp_path, write_spec(tmp_path), AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
    assert done.returncode == 0, done.stderr
    task = sky.Task.from_yaml(str(task_yaml))
    assert {str(r.cloud) for r in task.resources}.isdisjoint({"Vast", "RunPod"})
    assert task.storage_mounts["/ckpt"].mode == sky.StorageMode.MOUNT_CACHED
    # The cheaper options left out, with SkyPilot's reason, on stderr beside the plan.
    assert "skypilot cannot launch were left out; the cheapest:" in done.stderr
    assert "cannot mount a bucket; to write checkpoints to s3:// from it, set AWS_ACCESS_KEY_ID" in done.stderr


def test_spotune_plan_for_skypilot_lists_the_rejected_offers_with_skypilots_reason(tmp_path, enabled):
    done = subprocess.run([sys.executable, "-m", "orchestrator", "plan", str(write_spec(tmp_path)), "--backend", "skypilot",
                           "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "SKY_RUNTIME_DIR": seeded_runtime(),
                               "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    assert done.returncode == 0, done.stderr
    import json

    plan = json.loads(done.stdout)
    assert [o["rank"] for o in plan["options"]] == list(range(1, len(plan["options"]) + 1))
    assert {o["provider"] for o in plan["options"]} <= {"aws", "gcp", "lambda"}
    refused = [r for r in plan["rejected"] if r["reason"] == "not_launchable"]
    assert {r["provider"] for r in refused} >= {"vast", "runpod"}
    assert any(r["detail"].startswith("Vast cannot mount a bucket; to write checkpoints to s3://") for r in refused)
    assert plan["assumptions"]["rejected_counts"]["not_launchable"] >= len(refused)


def test_with_no_cloud_enabled_plan_and_launch_say_so_in_one_line(tmp_path, enabled):
    from sky import global_user_state, skypilot_config
    from sky.clouds.cloud import CloudCapability

    global_user_state.set_enabled_clouds([], CloudCapability.COMPUTE, skypilot_config.get_active_workspace())
    spec = write_spec(tmp_path)
    for args in (["plan", str(spec), "--backend", "skypilot"], ["launch", str(spec), "--backend", "skypilot"]):
        done = subprocess.run([sys.executable, "-m", "orchestrator", "--state-dir", str(tmp_path / "state"), *args],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO), "SKY_RUNTIME_DIR": seeded_runtime()})
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("error: no feasible option for 8b-qlora: "
                               "not_launchable: SkyPilot has no cloud enabled: run `sky check`")
    assert not (tmp_path / "state" / "runs").exists()
