"""SkyPilotBackend against recorded queue_v2 sequences: the SDK is replaced at its boundary (the calls the
backend makes, each returning a request id that `get` resolves), and SkyPilot's own decoders and exception
serialisation shape what comes back; the real adapter code does the rest."""
from __future__ import annotations

import copy
import json
import threading
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
from launch import skypilot as skypilot_module
from launch.sky_attempts import parse_cluster_resources
from launch.sky_sdk import SkyCallTimeout
from launch.skypilot import SkyPilotBackend
from orchestrator.quote import money

sky = sky_with_seeded_catalog()


@pytest.fixture(autouse=True)
def _sky_runtime(monkeypatch):
    """SkyPilot's state and config for these tests live in the seeded runtime dir too, where
    `sky check` has enabled the clouds of the recorded jobs (compute, and storage where they have it)."""
    monkeypatch.setenv("SKY_RUNTIME_DIR", seeded_runtime())
    from sky import global_user_state, skypilot_config
    from sky.clouds.cloud import CloudCapability

    workspace = skypilot_config.get_active_workspace()
    global_user_state.set_enabled_clouds(["AWS", "GCP", "Lambda"], CloudCapability.COMPUTE, workspace)
    global_user_state.set_enabled_clouds(["AWS", "GCP"], CloudCapability.STORAGE, workspace)
from sky import exceptions as sky_exceptions  # noqa: E402
from sky.server.requests.serializers import decoders, encoders  # noqa: E402
from sky.server.requests.serializers.decoders import decode_cost_report, decode_jobs_queue_v2  # noqa: E402
from sky.utils import dag_utils, status_lib  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "sky"
T = 1795000000.0
HANG_LIMIT = 60.0  # a hanging fake gives up after this long, so a broken test cannot hang the suite


def catalog_placement(region: str, instance_type: str = "g5.xlarge", spot: bool = True, provider: str = "aws") -> Placement:
    """A placement as the orchestrator makes one from a plan option: the catalog's offer and price."""
    offer = next(o for o in catalog_offers() if (o.provider, o.region, o.instance_type) == (provider, region, instance_type))
    return Placement(provider=offer.provider, region=offer.region, gpu=offer.gpu, gpu_count=offer.gpu_count,
                     spot=spot, price_per_hour=offer.price(spot), instance_type=offer.instance_type)


# Where the recorded queue_v2 snapshots ran: spot g5.xlarge (1x A10G) in us-east-1, then us-west-2.
EAST = catalog_placement("us-east-1")
WEST = catalog_placement("us-west-2")


def client_side(error: Exception) -> Exception:
    """An exception as the SkyPilot client raises it from `get`: serialised by the API server,
    pickled, unpickled and rebuilt (sky/server/requests/requests.py, Request.set_error/get_error)."""
    wire = encoders.pickle_and_encode(sky_exceptions.serialize_exception(error))
    return sky_exceptions.deserialize_exception(decoders.decode_and_unpickle(wire))


class FakeSky:
    """Stands in for the `sky` module: jobs.launch / queue_v2 / cancel / tail_logs, cost_report,
    api_cancel and get. queue_v2 answers with the next recorded snapshot, decoded by SkyPilot's own
    decoder; a recorded `raise` comes back as the client would raise it. tail_logs serves `log`
    (a list of lines) with SkyPilot's tail / tail_offset semantics."""

    def __init__(self, scenario: str, log: list[str] = (), cost_report=()):
        recorded = json.loads((FIXTURES / f"{scenario}.json").read_text())
        self.managed_job_id = recorded["managed_job_id"]
        self.snapshots = recorded["polls"]
        self.log = list(log)
        self.cost_report_records = cost_report
        self.status = None              # the status of the last snapshot served
        self.results, self.cancelled, self.api_cancelled, self.log_reads = {}, [], [], []
        self.sent_yaml, self.queue_fields = None, None
        self.hang = None                # "queue" or "logs": that call waits for `release`
        self.release, self.hang_ended = threading.Event(), threading.Event()
        self.jobs = SimpleNamespace(launch=self._launch, queue_v2=self._queue_v2, cancel=self._cancel,
                                    tail_logs=self._tail_logs)

    def _request(self, result, what: str = "") -> str:
        request_id = f"req-{what}-{len(self.results) + len(self.cancelled) + len(self.log_reads) + 1}-{id(result)}"
        self.results[request_id] = result
        return request_id

    def get(self, request_id):
        result = self.results.pop(request_id)
        if request_id.startswith("req-queue-") and self.hang == "queue":
            self._wait_for_release()
        if isinstance(result, Exception):
            raise result
        return result

    def _wait_for_release(self):
        self.release.wait(HANG_LIMIT)
        self.hang_ended.set()

    def api_cancel(self, request_ids, silent=False):
        self.api_cancelled.append(request_ids)
        return "req-api-cancel"

    def _launch(self, task, name=None):
        self.task, self.name = task, name
        # What the real client sends to the API server.
        self.sent_yaml = dag_utils.dump_dag_to_yaml_str(dag_utils.convert_entrypoint_to_dag(task))
        return self._request(([self.managed_job_id], None), "launch")

    def _queue_v2(self, refresh, skip_finished=False, all_users=False, job_ids=None, fields=None, **_):
        assert refresh is False  # never restart a stopped controller behind the user's back
        self.queue_fields = fields
        snapshot = self.snapshots.pop(0) if len(self.snapshots) > 1 else self.snapshots[0]
        if "raise" in snapshot:
            down = snapshot["raise"]
            self.status = "CONTROLLER DOWN"
            return self._request(client_side(sky_exceptions.ClusterNotUpError(
                down["message"], cluster_status=status_lib.ClusterStatus(down["cluster_status"]))), "queue")
        decoded = decode_jobs_queue_v2(copy.deepcopy(snapshot))
        self.status = decoded[0][0].status.value
        return self._request(decoded, "queue")

    def _cancel(self, name=None, job_ids=None, graceful=False, **_):
        self.cancelled.append((job_ids, graceful))
        return self._request(None, "cancel")

    def cost_report(self, days=None):
        if isinstance(self.cost_report_records, Exception):
            return self._request(self.cost_report_records, "cost")
        return self._request(decode_cost_report(copy.deepcopy(list(self.cost_report_records))), "cost")

    def _tail_logs(self, name=None, job_id=None, follow=True, tail=None, tail_offset=None, preload_content=True, **_):
        assert preload_content is False and job_id == self.managed_job_id
        self.log_reads.append((self.status, tail, tail_offset))
        if tail is None:
            lines = self.log
        else:  # sky/skylet/log_lib.py tail_lines_from_end: the last `tail` lines before the last `tail_offset`
            end = len(self.log) - (tail_offset or 0)
            lines = self.log[max(0, end - tail):max(0, end)]
        text = "".join(line + "\n" for line in lines)
        half = len(text) // 2  # chunks need not end on a line boundary

        def chunks():
            yield text[:half]
            if self.hang == "logs":  # the server keeps the stream open while the job is not RUNNING
                self._wait_for_release()
            yield text[half:]
            yield None
        return chunks()


def event_line(event: str, time: float, attempt: int = 1, **fields) -> str:
    return "[spotune-event] " + json.dumps({"event": event, "time": time, "attempt": attempt, **fields},
                                           separators=(", ", ": "))


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


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    """The backend's clock, set to when the recorded job was launched (T - 60)."""
    now = SimpleNamespace(value=T - 60)
    monkeypatch.setattr(skypilot_module, "time", SimpleNamespace(time=lambda: now.value))
    return now


def backend(tmp_path, fake, **timeouts) -> SkyPilotBackend:
    return SkyPilotBackend(tmp_path, sdk=fake, events_refresh_seconds=0, timeouts=timeouts or None)


def submitted(tmp_path, fake, request=None, **timeouts) -> tuple[SkyPilotBackend, str]:
    sky_backend = backend(tmp_path, fake, **timeouts)
    return sky_backend, sky_backend.submit(request or launch_request(tmp_path))


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def cost(attempts) -> Decimal:
    return money(sum((Decimal(str((a.ended_at - a.started_at).total_seconds())) / 3600 * a.placement.price_per_hour
                      for a in attempts), Decimal(0)))


# ---- attempts: where, from when to when, at what price ---------------------------------------

def test_each_attempt_runs_from_provisioning_start_to_termination_at_the_price_of_where_it_ran(tmp_path):
    fake = FakeSky("preempted_then_succeeded")
    sky_backend, external_id = submitted(tmp_path, fake)
    assert external_id == "7"

    observations = [sky_backend.poll(external_id) for _ in range(7)]

    assert [o.state for o in observations] == ["pending", "pending", "running", "running", "recovering",
                                               "running", "succeeded"]
    first, second = observations[-1].attempts
    assert (first.n, first.placement, first.external_id) == (1, EAST, "demo-1-7-5f3a-2ea4c1d0")
    # From STARTING (submitted_at: the controller starts provisioning) to the recovery, which
    # SkyPilot timed exactly in job_duration; the next attempt is provisioned from there.
    assert (first.started_at, first.ended_at, first.end_reason) == (utc(T), utc(T + 3720), "preempted")
    assert (second.n, second.placement) == (2, WEST)
    assert (second.started_at, second.ended_at, second.end_reason) == (utc(T + 3720), utc(T + 9400), "finished")
    # 1.033 h at $0.4364 + 1.578 h at $0.4857
    assert cost(observations[-1].attempts) == Decimal("1.22")
    # The attempt closes as soon as SkyPilot reports RECOVERING, before the new region is known.
    assert [a.end_reason for a in observations[4].attempts] == ["preempted"]
    assert {"cloud", "region", "submitted_at", "last_recovered_at", "job_duration",
            "cluster_resources_full"} <= set(fake.queue_fields)


def test_among_every_feasible_option_an_attempt_is_priced_as_the_one_it_ran_on(tmp_path):
    """The orchestrator passes every plan option; the same region on demand, another instance
    with the same GPU, and another region's price must not be mistaken for where it ran."""
    decoys = (catalog_placement("us-west-2", "g5.16xlarge"), catalog_placement("us-east-1", spot=False),
              catalog_placement("us-east-1", "g5.24xlarge"), catalog_placement("us-west-2", spot=False))
    request = launch_request(tmp_path, placements=(*decoys, EAST, WEST))
    sky_backend, external_id = submitted(tmp_path, FakeSky("preempted_then_succeeded"), request)
    final = [sky_backend.poll(external_id) for _ in range(7)][-1]

    assert [a.placement for a in final.attempts] == [EAST, WEST]
    saved = json.loads((request.run_dir / "skypilot.json").read_text())["placements"]
    assert [Placement.from_json(p) for p in saved] == list(request.placements)


def test_a_gcp_n1_host_is_priced_with_the_gpus_it_carried():
    """One n1 host type carries T4:2 or V100:1; the instance type alone would take the first listed.
    (Matched on the decoded records directly: the seeded catalog has no GCP n1 host rows to launch.)"""
    from launch.sky_attempts import placement_of

    v100 = Placement("gcp", "us-central1", "V100", 1, True, Decimal("0.830000"), "n1-standard-8")
    t4x2 = Placement("gcp", "us-central1", "T4", 2, True, Decimal("0.400000"), "n1-standard-8")
    state = {"placements": [v100.to_json(), t4x2.to_json()]}
    running, gone = (decode_jobs_queue_v2(snapshot)[0][0]
                     for snapshot in json.loads((FIXTURES / "gcp_t4_on_n1.json").read_text())["polls"])

    assert placement_of(state, running) == t4x2     # live: 'gpus=T4:2, ..., n1-standard-8' and accelerators
    assert placement_of(state, gone) == t4x2        # cluster gone: the requested '1x[T4:2][Spot]'


def test_an_attempt_on_resources_it_was_not_given_is_one_clear_error(tmp_path):
    sky_backend, external_id = submitted(tmp_path, FakeSky("preempted_then_succeeded"), launch_request(tmp_path, (EAST,)))
    for _ in range(5):  # up to RECOVERING: us-east-1 is priced
        sky_backend.poll(external_id)
    with pytest.raises(BackendError) as failure:
        sky_backend.poll(external_id)  # now running in us-west-2
    assert str(failure.value) == ("SkyPilot ran managed job 7 on aws/us-west-2 g5.xlarge (A10G:1) spot, which matches "
                                  "none of the placements it was launched with: cannot price the attempt")


@pytest.mark.parametrize("text, parsed", [
    ("1x[spot](gpus=A10G:1, cpus=4, mem=16, g5.xlarge, disk=256)", ("g5.xlarge", {("A10G", 1)}, {True})),
    ("1x(gpus=T4:2, n1-standard-8, ...)", ("n1-standard-8", {("T4", 2)}, {False})),
    # A job whose cluster is gone reports what was requested (backend_utils.get_task_resources_str).
    ("1x[A10G:1][Spot]", (None, {("A10G", 1)}, {True})),
    ("1x[A10G:1]", (None, {("A10G", 1)}, {False})),
    ("1x[A10G:1, L4:1][On-demand|Spot]", (None, {("A10G", 1), ("L4", 1)}, {False, True})),
])
def test_resources_strings_parse_as_skypilot_writes_them(text, parsed):
    assert parse_cluster_resources(text) == parsed


def test_a_terminal_job_whose_cluster_is_gone_is_priced_from_the_requested_resources(tmp_path):
    """A CLI that comes back after the job ended sees only SkyPilot's requested resources
    ('1x[A10G:1][Spot]': no instance type, Spot capitalised), never on demand."""
    on_demand_first = (catalog_placement("us-east-1", spot=False), EAST)
    fake = FakeSky("recipe_crashed")
    fake.snapshots = fake.snapshots[-1:]
    sky_backend, external_id = submitted(tmp_path, fake, launch_request(tmp_path, on_demand_first))
    final = sky_backend.poll(external_id)

    (attempt,) = final.attempts
    assert attempt.placement == EAST
    assert (attempt.started_at, attempt.ended_at, attempt.end_reason) == (utc(T), utc(T + 720), "failed")


def test_a_re_attached_backend_continues_the_attempt_history(tmp_path, request_for):
    fake = FakeSky("preempted_then_succeeded")
    first_cli, external_id = submitted(tmp_path, fake, request_for)
    for _ in range(5):  # up to RECOVERING
        first_cli.poll(external_id)

    second_cli = backend(tmp_path, fake)  # a new process: knows only the runs dir
    final = [second_cli.poll(external_id) for _ in range(2)][-1]

    assert [(a.n, a.placement.region, a.end_reason) for a in final.attempts] == [
        (1, "us-east-1", "preempted"), (2, "us-west-2", "finished")]


def test_a_recovery_between_two_polls_is_timed_exactly_once_the_job_ends(tmp_path):
    sky_backend, external_id = submitted(tmp_path, FakeSky("recovered_between_polls"))
    observations = [sky_backend.poll(external_id) for _ in range(3)]

    assert [o.state for o in observations] == ["running", "running", "cancelled"]
    # Seen only as a new stretch: closed where it is known to have ended by then...
    assert observations[1].attempts[0].ended_at == utc(T + 4000)
    # ...and exactly from the terminal snapshot's job_duration: 3600 s of run before the last stretch.
    first, second = observations[-1].attempts
    assert (first.started_at, first.ended_at, first.end_reason) == (utc(T), utc(T + 3720), "preempted")
    assert (second.placement.region, second.started_at, second.ended_at, second.end_reason) == (
        "us-west-2", utc(T + 3720), utc(T + 4600), "cancelled")


def test_no_resources_fails_the_job_with_skypilots_reason_and_no_attempt(tmp_path):
    sky_backend, external_id = submitted(tmp_path, FakeSky("failed_no_resource"))
    final = [sky_backend.poll(external_id) for _ in range(3)][-1]

    assert final.state == "failed"
    assert final.attempts == ()
    assert final.detail.startswith("no resources: Failed to acquire resources in all zones in us-east-1")


def test_setup_failure_fails_the_job_and_closes_its_attempt(tmp_path):
    sky_backend, external_id = submitted(tmp_path, FakeSky("failed_setup"))
    final = [sky_backend.poll(external_id) for _ in range(3)][-1]

    assert (final.state, final.detail) == ("failed", "setup failed: Setup command failed with exit code 1.")
    (attempt,) = final.attempts
    assert (attempt.placement.region, attempt.started_at, attempt.ended_at, attempt.end_reason) == (
        "us-east-1", utc(T), utc(T + 420), "failed")


def test_recipe_crash_is_reported_as_such(tmp_path):
    sky_backend, external_id = submitted(tmp_path, FakeSky("recipe_crashed"))
    final = [sky_backend.poll(external_id) for _ in range(2)][-1]
    assert (final.state, final.detail) == ("failed", "recipe crashed: Job failed with return code list: [1]")
    assert final.attempts[0].end_reason == "failed"


# ---- preemption or crash: the recipe's word --------------------------------------------------

def test_a_crash_that_skypilot_retries_is_a_failed_attempt_not_a_preemption(tmp_path):
    sky_backend, external_id = submitted(tmp_path, FakeSky("crash_retried"))
    observations = [sky_backend.poll(external_id) for _ in range(5)]

    assert [o.state for o in observations] == ["running", "running", "recovering", "running", "succeeded"]
    first, second = observations[-1].attempts
    assert (first.ended_at, first.end_reason) == (utc(T + 3720), "failed")
    assert first.detail.startswith("the recipe crashed (it exited 1); SkyPilot restarts it on a new cluster; "
                                   "SkyPilot: Recovering: Job exited with exit code 1.")
    assert (second.placement, second.started_at, second.end_reason) == (EAST, utc(T + 3720), "finished")


def test_exit_75_after_a_checkpoint_is_a_preemption_even_when_skypilot_restarts_it_as_an_error(tmp_path):
    fake = FakeSky("crash_retried")
    recovering = fake.snapshots[2]["jobs"][0]
    recovering["details"] = ("Recovering: Job exited with exit code 75. Restarting the job (exit code(s) [75] matched "
                             "recover_on_exit_codes [75]). To see the job error output, run: sky jobs logs --controller 7")
    sky_backend, external_id = submitted(tmp_path, fake)
    final = [sky_backend.poll(external_id) for _ in range(5)][-1]

    assert [a.end_reason for a in final.attempts] == ["preempted", "finished"]
    assert final.attempts[0].detail.startswith("preempted: the recipe checkpointed and exited 75")


@pytest.mark.parametrize("last_event, reason", [("error", "failed"), ("preempted", "preempted")])
def test_a_recovery_without_an_exit_code_is_told_by_the_recipes_last_event(tmp_path, last_event, reason):
    """'Cluster preempted or failed' says nothing; the event the recipe wrote before its attempt
    ended does, once the next node re-emits the synced events file into the log."""
    start = event_line("start", T + 130, resumed_from_step=None)
    step = event_line("step", T + 200, step=1, tokens=4096)
    ended = event_line(last_event, T + 3500, step=9, **({"message": "CUDA error"} if last_event == "error" else {"signal": "SIGTERM"}))
    fake = FakeSky("preempted_then_succeeded", log=["Setting up...", start, step])
    sky_backend, external_id = submitted(tmp_path, fake)
    for _ in range(5):  # the RECOVERING poll: the attempt's last event has not reached the log yet
        observation = sky_backend.poll(external_id)
    assert [a.end_reason for a in observation.attempts] == ["preempted"]

    fake.log += [start, step, ended, event_line("start", T + 4010, attempt=2, resumed_from_step=9)]
    final = [sky_backend.poll(external_id) for _ in range(2)][-1]

    assert [a.end_reason for a in final.attempts] == [reason, "finished"]
    assert final.attempts[0].detail.endswith("SkyPilot: Recovering: Cluster preempted or failed, recovering")


# ---- a watcher that never blocks ------------------------------------------------------------

def test_the_log_is_never_read_while_the_job_is_not_running(tmp_path):
    fake = FakeSky("preempted_then_succeeded", log=["Setting up...", event_line("start", T + 130)])
    sky_backend, external_id = submitted(tmp_path, fake)
    for _ in range(7):
        sky_backend.poll(external_id)

    assert fake.log_reads and {status for status, _, _ in fake.log_reads} == {"RUNNING", "SUCCEEDED"}


def test_the_log_is_read_incrementally_back_to_the_last_event_already_copied(tmp_path, monkeypatch):
    monkeypatch.setattr(skypilot_module, "LOG_PAGE_LINES", 3)
    events = [event_line("step", T + 200 + i, step=i, tokens=100 * i) for i in range(1, 4)]
    fake = FakeSky("preempted_then_succeeded",
                   log=["Setting up...", "noise a", events[0], "noise b", events[1], "noise c", "noise d"])
    sky_backend, external_id = submitted(tmp_path, fake)
    for _ in range(3):  # PENDING, STARTING, then RUNNING: the first read pages back to the log's start
        sky_backend.poll(external_id)
    assert [(tail, offset) for _, tail, offset in fake.log_reads] == [(3, 0), (3, 3), (3, 6)]

    fake.log += ["noise e", events[2], "noise f"]
    fake.log_reads.clear()
    final = sky_backend.poll(external_id)  # RUNNING: reads back only to the page holding events[1]

    assert [(tail, offset) for _, tail, offset in fake.log_reads] == [(3, 0), (3, 3)]
    lines = final.events_path.read_text().splitlines()
    assert lines == [e.removeprefix("[spotune-event] ") for e in events]


def test_a_status_call_that_hangs_fails_the_poll_within_its_deadline_and_is_cancelled(tmp_path):
    fake = FakeSky("preempted_then_succeeded")
    sky_backend, external_id = submitted(tmp_path, fake, queue=0.2)
    fake.hang = "queue"
    try:
        with pytest.raises(SkyCallTimeout, match=r"^SkyPilot queue did not answer within 0.2 s"):
            sky_backend.poll(external_id)
        assert not fake.hang_ended.is_set()  # the poll came back while the SDK call still hung
        assert len(fake.api_cancelled) == 1 and fake.api_cancelled[0].startswith("req-queue-")
    finally:
        fake.release.set()


def test_a_log_read_that_hangs_leaves_the_status_on_time_and_is_not_piled_up(tmp_path):
    fake = FakeSky("preempted_then_succeeded", log=[event_line("start", T + 130)])
    sky_backend, external_id = submitted(tmp_path, fake, logs=0.2)
    sky_backend.poll(external_id), sky_backend.poll(external_id)  # PENDING, STARTING
    fake.hang = "logs"
    try:
        running = sky_backend.poll(external_id)
        again = sky_backend.poll(external_id)
        assert not fake.hang_ended.is_set()
        assert (running.state, again.state) == ("running", "running")
        assert len(fake.log_reads) == 1  # the second refresh did not start another read
    finally:
        fake.release.set()


# ---- re-attach after the controller has stopped ----------------------------------------------

def test_a_controller_that_stopped_after_the_recipe_finished_closes_the_job_from_its_events(tmp_path):
    log = [event_line("start", T + 130), event_line("step", T + 200, step=1, tokens=4096),
           event_line("finished", T + 3000, step=1, tokens=4096, final_loss=1.0, train_seconds=2870.0,
                      output_path="/ckpt/out")]
    sky_backend, external_id = submitted(tmp_path, FakeSky("controller_stopped", log=log))
    assert sky_backend.poll(external_id).state == "running"

    closed = sky_backend.poll(external_id)

    assert closed.state == "succeeded"
    (attempt,) = closed.attempts
    assert (attempt.ended_at, attempt.end_reason) == (utc(T + 3000), "finished")
    assert "controller had already stopped" in attempt.detail
    assert sky_backend.poll(external_id).state == "succeeded"  # settled: asks SkyPilot nothing more


def test_a_controller_that_stopped_with_the_end_unknown_says_so_in_one_line(tmp_path):
    sky_backend, external_id = submitted(tmp_path, FakeSky("controller_stopped", log=[event_line("start", T + 130)]))
    sky_backend.poll(external_id)

    with pytest.raises(BackendError) as failure:
        sky_backend.poll(external_id)
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("SkyPilot's jobs controller has stopped, so managed job 7 has ended, but how is unknown")
    assert "last saw it RUNNING" in message and "aws/us-east-1 A10G spot" in message
    assert "`sky jobs queue --refresh`" in message and "`spotune resume demo-1`" in message


def test_a_job_recorded_as_ended_is_closed_from_the_record_when_the_controller_has_stopped(tmp_path):
    fake = FakeSky("recipe_crashed")
    fake.snapshots.append(json.loads((FIXTURES / "controller_stopped.json").read_text())["polls"][-1])
    sky_backend, external_id = submitted(tmp_path, fake, logs=0.2)
    fake.hang = "logs"  # the terminal log read does not come back before the controller stops
    try:
        sky_backend.poll(external_id)
        ended = sky_backend.poll(external_id)
        after = sky_backend.poll(external_id)
    finally:
        fake.release.set()

    assert (ended.state, after.state) == ("failed", "failed")
    assert after.detail == "recipe crashed: Job failed with return code list: [1]"
    assert after.attempts == ended.attempts


# ---- the controller's own line -----------------------------------------------------------------

def cost_report_records() -> list[dict]:
    return json.loads((FIXTURES / "controller_cost_report.json").read_text())["cost_report"]


def test_the_jobs_controller_is_its_own_line_priced_by_skypilots_cost_report(tmp_path):
    fake = FakeSky("preempted_then_succeeded", cost_report=cost_report_records())
    sky_backend, external_id = submitted(tmp_path, fake)
    observations = [sky_backend.poll(external_id) for _ in range(7)]

    controller = [a for a in observations[3].attempts if a.kind == "controller"]
    assert [(a.n, a.ended_at) for a in controller] == [(0, None)]  # open while the job runs
    *training, line = observations[-1].attempts
    assert [a.kind for a in training] == ["training", "training"]
    assert (line.n, line.kind, line.placement) == (0, "controller", Placement(
        "aws", "us-east-1", "CPU", 0, False, Decimal("0.192000"), "m6i.xlarge"))
    # From this job's launch until the controller stopped after it (autostop, 10 idle minutes).
    assert (line.started_at, line.ended_at, line.end_reason) == (utc(T - 60), utc(T + 10000), "finished")
    assert "priced by SkyPilot's cost report" in line.detail


def test_without_a_cost_report_the_controller_is_estimated_from_skypilots_catalog(tmp_path, clock):
    """SkyPilot's own pick for CONTROLLER_RESOURCES (4+ vCPUs, 4x memory) on the plan's cloud, in
    its catalog; here a job that never got a GPU still pays for the controller that tried."""
    lambda_a10 = next(o for o in catalog_offers() if o.provider == "lambda" and o.gpu == "A10")
    placement = Placement("lambda", lambda_a10.region, "A10", 1, False, lambda_a10.price(False), lambda_a10.instance_type)
    fake = FakeSky("failed_no_resource", cost_report=RuntimeError("cost report is not available"))
    sky_backend, external_id = submitted(tmp_path, fake, launch_request(tmp_path, (placement,)))
    final = [sky_backend.poll(external_id) for _ in range(3)][-1]

    (line,) = final.attempts
    assert (line.kind, line.placement.provider, line.placement.instance_type, line.placement.price_per_hour) == (
        "controller", "lambda", "cpu_4x_generalx", Decimal("0.200000"))
    assert (line.started_at, line.ended_at) == (utc(T - 60), utc(T + 900 + 600))
    assert line.detail.startswith("estimated: SkyPilot's cost report was unavailable")


def test_the_ledger_bills_the_controller_on_its_own_line_and_reconciliation_shows_its_share(tmp_path):
    """Through the real watcher, a real SQLite ledger, reconcile and the report: the controller is in
    the actual cost, as a fourth part of the variance, and is no attempt at training."""
    from rich.console import Console

    from ledger_factory import make_option, make_plan, make_spec, spec_yaml
    from orchestrator.ledger import Ledger
    from orchestrator.quote import Offer
    from orchestrator.reconcile import reconcile_job
    from orchestrator.report import build_entries, render_job
    from orchestrator.watch import Watcher

    offer = Offer("aws", "us-east-1", "g5.xlarge", "A10G", 1, 24.0, Decimal("1.006"), EAST.price_per_hour)
    plan = make_plan(make_option(offer=offer, price=str(EAST.price_per_hour), hours=2.5, overhead=0.1))
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        job_id = ledger.create_job(make_spec(), spec_yaml(), "skypilot", plan, 1)
        fake = FakeSky("preempted_then_succeeded", cost_report=cost_report_records())
        sky_backend, external_id = submitted(tmp_path, fake)
        ledger.set_external_id(job_id, external_id)
        watcher = Watcher(ledger, job_id, sky_backend, external_id, poll_seconds=0.01)
        ticks = [watcher.tick(now=utc(T + 9400)) for _ in range(7)]

        assert ticks[-1].job.status == "succeeded"
        assert [(a.n, a.kind) for a in ledger.attempts(job_id)] == [(0, "controller"), (1, "training"), (2, "training")]
        rec = reconcile_job(ledger, job_id, now=utc(T + 20000))
        # $1.22 of GPU attempts + 2.794 h of m6i.xlarge at $0.192 = $0.54
        assert (rec.actual_cost, rec.controller, len(rec.attempts), rec.preemptions) == (
            Decimal("1.75"), Decimal("0.54"), 2, 1)
        assert rec.price + rec.throughput + rec.preemption + rec.controller == rec.variance
        assert "+$0.54 jobs controller (2.794 h, not in the estimate)" in rec.story()

        entry = build_entries(ledger, [ledger.get_job(job_id)], utc(T + 20000))[0]
        as_json = entry.to_json()
        in_cents = lambda amount: Decimal(str(amount)).quantize(Decimal("0.01"))  # noqa: E731 (JSON money: text or number)
        assert (in_cents(as_json["variance"]["controller"]), in_cents(as_json["controller"]["cost"])) == (
            Decimal("0.54"), Decimal("0.54"))
        assert as_json["controller"]["instance_type"] == "m6i.xlarge"
        assert [a["n"] for a in as_json["attempts"]] == [1, 2]
        console = Console(record=True, width=160)
        render_job(console, entry)
        text = console.export_text()
        assert "controller  " in text and "SkyPilot's jobs controller, not in the estimate" in text
        assert "2.794 h at $0.1920/h: $0.54" in text


# ---- submit, cancel, logs ---------------------------------------------------------------------

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


def test_submit_sends_secrets_from_the_environment_and_keeps_them_out_of_envs_and_state(
        tmp_path, request_for, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_only_for_the_node_41a7")
    fake = FakeSky("preempted_then_succeeded")
    submitted(tmp_path, fake, request_for)

    assert fake.name == "demo-1"
    assert fake.task.secrets["HF_TOKEN"].get_secret_value() == "hf_only_for_the_node_41a7"
    assert "HF_TOKEN" not in fake.task.envs
    assert [(str(r.cloud), r.region) for r in fake.task.resources] == [("AWS", "us-east-1"), ("AWS", "us-west-2")]
    state_text = (request_for.run_dir / "skypilot.json").read_text()
    assert "hf_only_for_the_node_41a7" not in state_text


def test_progress_events_are_collected_from_the_job_log_without_duplicates(tmp_path, request_for):
    start = event_line("start", T + 130, resumed_from_step=None)
    step = event_line("step", T + 200, step=1, tokens=4096)
    resumed = event_line("start", T + 4010, attempt=2, resumed_from_step=1)
    fake = FakeSky("preempted_then_succeeded", log=["Setting up...", start, step, "step 1 loss 2.3"])
    sky_backend, external_id = submitted(tmp_path, fake, request_for)
    for _ in range(5):
        sky_backend.poll(external_id)
    # after the recovery the new node re-emits the synced file, then appends
    fake.log += [start, step, resumed, "[spotune-event] {truncated"]
    final = [sky_backend.poll(external_id) for _ in range(2)][-1]

    assert final.events_path == request_for.run_dir / "events.jsonl"
    assert final.events_path.read_text().splitlines() == [e.removeprefix("[spotune-event] ") for e in (start, step, resumed)]


def test_cancel_is_graceful_so_the_sigterm_checkpoint_is_uploaded(tmp_path):
    fake = FakeSky("preempted_then_succeeded")
    sky_backend, external_id = submitted(tmp_path, fake)
    sky_backend.cancel(external_id)
    sky_backend.cancel(external_id, graceful=False)
    assert fake.cancelled == [([7], True), ([7], False)]


def test_logs_yield_whole_lines_across_chunks(tmp_path):
    fake = FakeSky("preempted_then_succeeded", log=["alpha", "beta gamma", "delta"])
    sky_backend, external_id = submitted(tmp_path, fake)
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
    (tmp_path / "spec.yaml").write_text("name: demo\nmodel: tiny-llama\nmethod: lora\nseq_len: 512\ndata: {path: train.jsonl}\n"
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
