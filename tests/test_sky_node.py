"""The node helper the SkyPilot run script calls (launch/sky_node.py): the exit status SkyPilot acts
on, the crash count kept in the durable store, and the store itself on a real S3 API (moto's
server on 127.0.0.1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3_server import HoldingProxy, moto_s3, new_bucket, object_keys, s3_env

from launch.sky_node import EXIT_RETRY_AFTER_CRASH, RestartCount, exit_status, prepare, publish

REPO = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000.0


def ev(event, t, **fields):
    return {"event": event, "time": t, "attempt": 1, **fields}


@pytest.mark.parametrize("rc, events, expected", [
    (0, [ev("finished", T0 + 5)], 0),
    (75, [ev("preempted", T0 + 5)], 75),
    (1, [ev("start", T0 + 1), ev("preempted", T0 + 5)], 75),                     # torchrun's 1 for a 75
    (2, [ev("error", T0 + 1, kind="bad_input")], 2),
    (1, [ev("error", T0 + 1, kind="bad_input")], 2),                            # under torchrun
    (1, [ev("error", T0 + 1, kind="disk_full")], 74),
    (1, [ev("start", T0 + 1), ev("over_budget", T0 + 5)], 80),
    (81, [ev("diverged", T0 + 5)], 81),
    (1, [ev("start", T0 + 1), ev("error", T0 + 5, kind="crash")], EXIT_RETRY_AFTER_CRASH),
    (1, [ev("preempted", T0 - 600)], EXIT_RETRY_AFTER_CRASH),                   # an earlier attempt's preemption
    (137, [], EXIT_RETRY_AFTER_CRASH),                                          # killed before any event
])
def test_the_status_skypilot_sees(tmp_path, rc, events, expected):
    assert exit_status(rc, events, T0, RestartCount(str(tmp_path / "crash-restarts")), max_restarts=3) == expected


def test_crashes_past_the_restart_budget_end_the_job(tmp_path):
    restarts = RestartCount(str(tmp_path / "crash-restarts"))
    crash = [ev("error", T0 + 1, kind="crash")]
    assert [exit_status(1, crash, T0, restarts, max_restarts=2) for _ in range(3)] == [76, 76, 1]
    assert exit_status(1, crash, T0, RestartCount(str(tmp_path / "other")), max_restarts=0) == 1


@pytest.fixture
def s3(monkeypatch):
    with moto_s3() as endpoint:
        for name, value in s3_env(endpoint).items():
            monkeypatch.setenv(name, value)
        yield endpoint


def test_the_crash_count_lives_in_the_store_so_a_new_node_continues_it(s3):
    bucket = new_bucket(s3)
    url = f"s3://{bucket}/runs/job-1/crash-restarts"
    assert RestartCount(url).read() == 0
    RestartCount(url).write(1)
    assert RestartCount(url).read() == 1  # another node, another object: the same count
    assert object_keys(s3, bucket) == ["runs/job-1/crash-restarts"]


def test_prepare_creates_the_jobs_own_bucket(s3):
    import boto3

    assert prepare("s3://spotune-ckpt-demo-20261129-ab12/demo-20261129-ab12") == 0
    names = [b["Name"] for b in boto3.client("s3", endpoint_url=s3).list_buckets()["Buckets"]]
    assert "spotune-ckpt-demo-20261129-ab12" in names
    assert object_keys(s3, "spotune-ckpt-demo-20261129-ab12") == []  # the write probe is gone


def test_refused_credentials_are_bad_input_in_one_line(s3, monkeypatch, capsys):
    """moto checks signatures once told to (as S3 does): an unknown key is refused with 403."""
    from moto import settings

    bucket = new_bucket(s3)
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    assert prepare(f"s3://{bucket}/job-1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint store s3://{bucket}/job-1: access denied")
    assert "testing" not in err[0]  # no credential value in the message


def test_publish_uploads_the_output_and_writes_the_manifest_last(s3, tmp_path):
    bucket = new_bucket(s3)
    output = tmp_path / "output"
    (output / "merged").mkdir(parents=True)
    (output / "adapter_model.safetensors").write_bytes(b"a" * 1000)
    (output / "merged" / "config.json").write_text("{}")
    manifest = publish(output, f"s3://{bucket}/job-1/output")
    assert object_keys(s3, bucket) == ["job-1/output/adapter_model.safetensors", "job-1/output/merged/config.json",
                                       "job-1/output/spotune-output.json"]
    assert [(f["path"], f["bytes"]) for f in manifest["files"]] == [("adapter_model.safetensors", 1000),
                                                                   ("merged/config.json", 2)]


def test_a_publish_cut_off_midway_leaves_no_manifest_not_even_the_old_one(s3, tmp_path):
    """The node dies while uploading (the upload of the second file hangs until it is killed): a
    reader that trusts the manifest never takes the half-copied output for a whole one."""
    bucket = new_bucket(s3)
    output = tmp_path / "output"
    output.mkdir()
    (output / "a.bin").write_bytes(b"a" * 100)
    (output / "b.bin").write_bytes(b"b" * 100)
    url = f"s3://{bucket}/job-1/output"
    publish(output, url)  # an earlier, complete publish
    (output / "b.bin").write_bytes(b"B" * 100)
    proxy = HoldingProxy(s3, hold=rb"PUT /" + bucket.encode() + rb"/job-1/output/b\.bin")
    env = {**os.environ, **s3_env(proxy.endpoint), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "launch.sky_node", "publish", str(output), url], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proxy.held.wait(60), proc.stderr.read() if proc.poll() is not None else "no upload held"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proxy.close()
    assert "job-1/output/spotune-output.json" not in object_keys(s3, bucket)
    assert "job-1/output/a.bin" in object_keys(s3, bucket)


def test_the_exit_code_command_prints_only_the_status(tmp_path):
    events = tmp_path / "events.jsonl"
    now = time.time()
    events.write_text(json.dumps(ev("preempted", now + 1)) + "\n")
    done = subprocess.run([sys.executable, "-m", "launch.sky_node", "exit-code", "--rc", "1", "--events", str(events),
                           "--since", str(now), "--restarts", str(tmp_path / "n"), "--max-restarts", "3"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (done.returncode, done.stdout) == (0, "75\n")
