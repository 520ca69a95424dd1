"""SkyPilotBackend against recorded queue_v2 snapshots: the SDK is replaced at its boundary (the five
calls the backend makes), SkyPilot's own decoder and the real adapter code do the rest."""
from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from sky_catalog import catalog_offers, seeded_runtime, sky_with_seeded_catalog

from contract.backend import BackendError, LaunchRequest
from contract.placement import Placement
from contract.spec import load_spec
from launch.skypilot import SkyPilotBackend
from orchestrator.quote import money

sky = sky_with_seeded_catalog()


@pytest.fixture(autouse=True)
def _sky_runtime(monkeypatch):
    """SkyPilot's state and config for these tests live in the seeded runtime dir too."""
    monkeypatch.setenv("SKY_RUNTIME_DIR", seeded_runtime())
from sky.server.requests.serializers.decoders import decode_jobs_queue_v2  # noqa: E402
from sky.utils import dag_utils  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "sky"
T = 1795000000.0


def catalog_placement(region: str, instance_type: str = "g5.xlarge", spot: bool = True) -> Placement:
    """A placement as the orchestrator makes one from a plan option: the catalog's offer and price."""
    offer = next(o for o in catalog_offers() if (o.provider, o.region, o.instance_type) == ("aws", region, instance_type))
    return Placement(provider=offer.provider, region=offer.region, gpu=offer.gpu, gpu_count=offer.gpu_count,
                     spot=spot, price_per_hour=offer.price(spot), instance_type=offer.instance_type)


# Where the recorded queue_v2 snapshots ran: spot g5.xlarge (1x A10G) in us-east-1, then us-west-2.
EAST = catalog_placement("us-east-1")
WEST = catalog_placement("us-west-2")


class FakeSky:
    """Stands in for the `sky` module: jobs.launch / queue_v2 / cancel / tail_logs and get.

    Each call returns a request id, resolved by get(), as the client SDK does. queue_v2 answers
    with the next recorded snapshot, decoded by SkyPilot's own decoder into ManagedJobRecords."""

    def __init__(self, scenario: str, log: str = ""):
        recorded = json.loads((FIXTURES / f"{scenario}.json").read_text())
        self.managed_job_id = recorded["managed_job_id"]
        self.snapshots = recorded["polls"]
        self.log = log
        self.results, self.sent_yaml, self.cancelled, self.queue_fields = {}, None, [], None
        self.jobs = SimpleNamespace(launch=self._launch, queue_v2=self._queue_v2, cancel=self._cancel,
                                    tail_logs=self._tail_logs)

    def _request(self, result) -> str:
        request_id = f"req-{len(self.results) + len(self.cancelled) + 1}-{id(result)}"
        self.results[request_id] = result
        return request_id

    def get(self, request_id):
        return self.results.pop(request_id)

    def _launch(self, task, name=None):
        self.task, self.name = task, name
        # What the real client sends to the API server.
        self.sent_yaml = dag_utils.dump_dag_to_yaml_str(dag_utils.convert_entrypoint_to_dag(task))
        return self._request(([self.managed_job_id], None))

    def _queue_v2(self, refresh, skip_finished=False, all_users=False, job_ids=None, fields=None, **_):
        self.queue_fields = fields
        snapshot = self.snapshots.pop(0) if len(self.snapshots) > 1 else self.snapshots[0]
        return self._request(decode_jobs_queue_v2(copy.deepcopy(snapshot)))

    def _cancel(self, name=None, job_ids=None, graceful=False, **_):
        self.cancelled.append((job_ids, graceful))
        return self._request(None)

    def _tail_logs(self, name=None, job_id=None, follow=True, preload_content=True, **_):
        assert preload_content is False
        half = len(self.log) // 2  # chunks need not end on a line boundary
        return iter([self.log[:half], self.log[half:], None])


def launch_request(tmp_path, placements=(EAST, WEST)) -> LaunchRequest:
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text("name: demo\nmodel: tiny-llama\nmethod: lora\ndata: {path: train.jsonl}\n")
    spec = load_spec(spec_path)
    return LaunchRequest(job_id="demo-1", spec=spec, node_spec=spec.node_spec(), run_dir=tmp_path / "runs" / "demo-1",
                         placements=placements, env={"SPOTUNE_JOB_ID": "demo-1"})


@pytest.fixture
def request_for(tmp_path):
    return launch_request(tmp_path)


def backend(tmp_path, fake) -> SkyPilotBackend:
    return SkyPilotBackend(tmp_path, sdk=fake, events_refresh_seconds=0)


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def cost(attempts) -> Decimal:
    return money(sum((Decimal(str((a.ended_at - a.started_at).total_seconds())) / 3600 * a.placement.price_per_hour
                      for a in attempts), Decimal(0)))


def test_preempted_in_us_east_1_then_succeeded_in_us_west_2_gives_two_priced_attempts(tmp_path, request_for):
    fake = FakeSky("preempted_then_succeeded")
    sky_backend = backend(tmp_path, fake)
    external_id = sky_backend.submit(request_for)
    assert external_id == "7"

    observations = [sky_backend.poll(external_id) for _ in range(7)]

    assert [o.state for o in observations] == ["pending", "pending", "running", "running", "recovering",
                                               "running", "succeeded"]
    first, second = observations[-1].attempts
    assert (first.n, first.placement.region, first.placement.instance_type, first.placement.spot) == (
        1, "us-east-1", "g5.xlarge", True)
    assert first.placement.price_per_hour == Decimal("0.436400")
    assert (first.started_at, first.ended_at, first.end_reason) == (utc(T + 120), utc(T + 3720), "preempted")
    assert first.external_id == "demo-1-7-5f3a-2ea4c1d0"
    assert (second.n, second.placement.region, second.placement.price_per_hour) == (2, "us-west-2", Decimal("0.485700"))
    assert (second.started_at, second.ended_at, second.end_reason) == (utc(T + 4000), utc(T + 9400), "finished")
    # 1 h at $0.4364 + 1.5 h at $0.4857
    assert cost(observations[-1].attempts) == Decimal("1.16")
    # The attempt closes as soon as SkyPilot reports RECOVERING, before the new region is known.
    assert [a.end_reason for a in observations[4].attempts] == ["preempted"]
    assert {"cloud", "region", "last_recovered_at", "job_duration", "cluster_resources_full"} <= set(fake.queue_fields)


def test_among_every_feasible_option_an_attempt_is_priced_as_the_one_it_ran_on(tmp_path):
    """The orchestrator passes every plan option; the same region on demand, another instance
    with the same GPU, and another region's price must not be mistaken for where it ran."""
    decoys = (catalog_placement("us-west-2", "g5.16xlarge"), catalog_placement("us-east-1", spot=False),
              catalog_placement("us-east-1", "g5.24xlarge"), catalog_placement("us-west-2", spot=False))
    request = launch_request(tmp_path, placements=(*decoys, EAST, WEST))
    fake = FakeSky("preempted_then_succeeded")
    sky_backend = backend(tmp_path, fake)
    external_id = sky_backend.submit(request)
    final = [sky_backend.poll(external_id) for _ in range(7)][-1]

    assert [a.placement for a in final.attempts] == [EAST, WEST]
    saved = json.loads((request.run_dir / "skypilot.json").read_text())["placements"]
    assert [Placement.from_json(p) for p in saved] == list(request.placements)


def test_an_attempt_on_resources_it_was_not_given_is_one_clear_error(tmp_path):
    fake = FakeSky("preempted_then_succeeded")
    sky_backend = backend(tmp_path, fake)
    external_id = sky_backend.submit(launch_request(tmp_path, placements=(EAST,)))
    for _ in range(5):  # up to RECOVERING: us-east-1 is priced
        sky_backend.poll(external_id)
    with pytest.raises(BackendError) as failure:
        sky_backend.poll(external_id)  # now running in us-west-2
    assert str(failure.value) == ("SkyPilot ran managed job 7 on aws/us-west-2 g5.xlarge spot, which matches "
                                  "none of the placements it was launched with: cannot price the attempt")


def test_a_job_first_seen_after_its_cluster_is_gone_is_priced_from_the_requested_resources(tmp_path, request_for):
    """A CLI that comes back after the job ended sees only SkyPilot's requested resources
    ('1x[A10G:1][Spot]': no instance type, Spot capitalised)."""
    fake = FakeSky("recipe_crashed")
    fake.snapshots = fake.snapshots[-1:]
    sky_backend = backend(tmp_path, fake)
    external_id = sky_backend.submit(request_for)
    final = sky_backend.poll(external_id)

    (attempt,) = final.attempts
    assert attempt.placement == EAST
    assert (attempt.started_at, attempt.ended_at, attempt.end_reason) == (utc(T + 120), utc(T + 720), "failed")


def test_the_backend_describes_itself_on_the_protocol(tmp_path, request_for):
    from contract.backend import DeviceReport, make_backend

    sky_backend = make_backend("skypilot", tmp_path)
    assert isinstance(sky_backend, SkyPilotBackend)
    assert (sky_backend.name, sky_backend.pricing, sky_backend.options, sky_backend.poll_seconds) == (
        "skypilot", "catalog", (), 20.0)
    assert sky_backend.device() == DeviceReport(None, 0, None)
    text = sky_backend.describe(request_for)
    assert text.startswith("# spotune job demo-1: SkyPilot managed-job task (dry run, nothing launched)")
    ordered = yaml.safe_load(text)["resources"]["ordered"]
    assert [(r["infra"], r["instance_type"], r["use_spot"]) for r in ordered] == [
        ("aws/us-east-1", "g5.xlarge", True), ("aws/us-west-2", "g5.xlarge", True)]
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_a_re_attached_backend_continues_the_attempt_history(tmp_path, request_for):
    fake = FakeSky("preempted_then_succeeded")
    first_cli = backend(tmp_path, fake)
    external_id = first_cli.submit(request_for)
    for _ in range(5):  # up to RECOVERING
        first_cli.poll(external_id)

    second_cli = backend(tmp_path, fake)  # a new process: knows only the runs dir
    final = [second_cli.poll(external_id) for _ in range(2)][-1]

    assert [(a.n, a.placement.region, a.end_reason) for a in final.attempts] == [
        (1, "us-east-1", "preempted"), (2, "us-west-2", "finished")]


def test_a_recovery_between_two_polls_still_closes_the_first_attempt(tmp_path, request_for):
    fake = FakeSky("recovered_between_polls")
    sky_backend = backend(tmp_path, fake)
    external_id = sky_backend.submit(request_for)
    states = [sky_backend.poll(external_id).state for _ in range(3)]
    final = sky_backend.poll(external_id)

    assert states == ["running", "running", "cancelled"]
    first, second = final.attempts
    assert (first.ended_at, first.end_reason) == (utc(T + 4000), "preempted")
    assert (second.placement.region, second.ended_at, second.end_reason) == ("us-west-2", utc(T + 4600), "cancelled")


def test_no_resources_fails_the_job_with_skypilots_reason_and_no_attempt(tmp_path, request_for):
    fake = FakeSky("failed_no_resource")
    sky_backend = backend(tmp_path, fake)
    external_id = sky_backend.submit(request_for)
    final = [sky_backend.poll(external_id) for _ in range(3)][-1]

    assert final.state == "failed"
    assert final.attempts == ()
    assert final.detail.startswith("no resources: Failed to acquire resources in all zones in us-east-1")


def test_setup_failure_fails_the_job_and_closes_its_attempt(tmp_path, request_for):
    fake = FakeSky("failed_setup")
    sky_backend = backend(tmp_path, fake)
    external_id = sky_backend.submit(request_for)
    final = [sky_backend.poll(external_id) for _ in range(3)][-1]

    assert (final.state, final.detail) == ("failed", "setup failed: Setup command failed with exit code 1.")
    (attempt,) = final.attempts
    assert (attempt.placement.region, attempt.ended_at, attempt.end_reason) == ("us-east-1", utc(T + 420), "failed")


def test_recipe_crash_is_reported_as_such(tmp_path, request_for):
    fake = FakeSky("recipe_crashed")
    sky_backend = backend(tmp_path, fake)
    external_id = sky_backend.submit(request_for)
    final = [sky_backend.poll(external_id) for _ in range(2)][-1]
    assert (final.state, final.detail) == ("failed", "recipe crashed: Job failed with return code list: [1]")
    assert final.attempts[0].end_reason == "failed"


def test_submit_sends_secrets_from_the_environment_and_keeps_them_out_of_envs_and_state(
        tmp_path, request_for, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_only_for_the_node_41a7")
    fake = FakeSky("preempted_then_succeeded")
    sky_backend = backend(tmp_path, fake)
    sky_backend.submit(request_for)

    assert fake.name == "demo-1"
    assert fake.task.secrets["HF_TOKEN"].get_secret_value() == "hf_only_for_the_node_41a7"
    assert "HF_TOKEN" not in fake.task.envs
    assert [(str(r.cloud), r.region) for r in fake.task.resources] == [("AWS", "us-east-1"), ("AWS", "us-west-2")]
    state_text = (request_for.run_dir / "skypilot.json").read_text()
    assert "hf_only_for_the_node_41a7" not in state_text


def test_progress_events_are_collected_from_the_job_log_without_duplicates(tmp_path, request_for):
    start = json.dumps({"event": "start", "time": T + 130, "attempt": 1, "resumed_from_step": None})
    step = json.dumps({"event": "step", "time": T + 200, "attempt": 1, "step": 1, "tokens": 4096})
    resumed = json.dumps({"event": "start", "time": T + 4010, "attempt": 2, "resumed_from_step": 1})
    log = "\n".join([
        "Setting up...", f"[spotune-event] {start}", f"[spotune-event] {step}", "step 1 loss 2.3",
        # after the recovery the new node re-emits the synced file, then appends
        f"[spotune-event] {start}", f"[spotune-event] {step}", f"[spotune-event] {resumed}",
        "[spotune-event] {truncated", ""])
    fake = FakeSky("preempted_then_succeeded", log=log)
    sky_backend = backend(tmp_path, fake)
    external_id = sky_backend.submit(request_for)
    final = [sky_backend.poll(external_id) for _ in range(7)][-1]

    assert final.events_path == request_for.run_dir / "events.jsonl"
    assert final.events_path.read_text().splitlines() == [start, step, resumed]


def test_cancel_is_graceful_so_the_sigterm_checkpoint_is_uploaded(tmp_path, request_for):
    fake = FakeSky("preempted_then_succeeded")
    sky_backend = backend(tmp_path, fake)
    external_id = sky_backend.submit(request_for)
    sky_backend.cancel(external_id)
    sky_backend.cancel(external_id, graceful=False)
    assert fake.cancelled == [([7], True), ([7], False)]


def test_logs_yield_whole_lines_across_chunks(tmp_path, request_for):
    fake = FakeSky("preempted_then_succeeded", log="alpha\nbeta gamma\ndelta")
    sky_backend = backend(tmp_path, fake)
    external_id = sky_backend.submit(request_for)
    assert list(sky_backend.logs(external_id)) == ["alpha", "beta gamma", "delta"]


def test_a_real_sdk_call_with_the_local_api_server_disabled_fails_fast_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYPILOT_DISABLE_LOCAL_API_SERVER", "1")
    real = SkyPilotBackend(tmp_path)
    with pytest.raises(BackendError) as failure:
        real.cancel("7")
    message = str(failure.value)
    assert message.startswith("SkyPilot cancel failed: No SkyPilot API server endpoint is configured")
    assert "SKYPILOT_DISABLE_LOCAL_API_SERVER=1" in message and "\n" not in message


def test_polling_an_unknown_job_is_one_clear_error(tmp_path):
    with pytest.raises(BackendError, match="no run directory under .* knows SkyPilot managed job 99"):
        backend(tmp_path, FakeSky("failed_setup")).poll("99")


def test_spotune_launch_with_no_api_server_is_one_line_and_exit_2(tmp_path):
    """The whole path, in its own process: plan, record, build the real task, call the real SDK."""
    import os
    import subprocess
    import sys

    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "spec.yaml").write_text("name: demo\nmodel: tiny-llama\nmethod: lora\ndata: {path: train.jsonl}\n"
                                        "constraints: {providers: [aws, gcp, lambda]}\n")
    env = {**os.environ, "SKY_RUNTIME_DIR": seeded_runtime(),
           "SKYPILOT_DISABLE_LOCAL_API_SERVER": "1", "HF_TOKEN": "hf_never_in_state_93b1"}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "--state-dir", str(tmp_path / "state"),
                           "launch", str(tmp_path / "spec.yaml"), "--backend", "skypilot"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in done.stderr
    assert "SkyPilot launch failed: No SkyPilot API server endpoint is configured" in error_lines[0]
    assert not any("hf_never_in_state_93b1" in p.read_text(errors="ignore")
                   for p in (tmp_path / "state").rglob("*") if p.is_file())
