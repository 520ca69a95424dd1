"""The spot-notice watcher against each cloud's metadata API, played by a small HTTP server on 127.0.0.1.

Request and response shapes follow each cloud's documentation: AWS IMDSv2 (token PUT, then
spot/instance-action, 404 until scheduled), GCP instance/preempted (FALSE/TRUE, Metadata-Flavor
header), Azure Scheduled Events (Preempt naming this VM, Metadata header). The recipe is stood
in for by a sleeping process, which must end by the watcher's SIGTERM.
"""
import json
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from recipes.spot_notice import AwsNotice, AzureNotice, GcpNotice, watch

REPO = Path(__file__).resolve().parents[1]


class MetadataService:
    """A cloud's metadata endpoint: `answer(method, path, headers)` -> (status, body); every request is kept."""

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[tuple[str, str, dict]] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self):
                headers = {k.lower(): v for k, v in self.headers.items()}
                service.requests.append((self.command, self.path, headers))
                status, body = service.answer(self.command, self.path, headers)
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = _reply

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def polls(self, path_part: str) -> int:
        return sum(1 for _, path, _ in self.requests if path_part in path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recipe_stand_in():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


@pytest.fixture
def serve():
    services = []

    def start(answer):
        services.append(MetadataService(answer))
        return services[-1]

    yield start
    for service in services:
        service.close()


def aws_imds(notice_after: int, expire_token_at: int = -1):
    """IMDSv2: a token from PUT /latest/api/token; instance-action 404 until the notice."""
    state = {"tokens": 0, "polls": 0}

    def answer(method, path, headers):
        if path == "/latest/api/token":
            if method != "PUT" or "x-aws-ec2-metadata-token-ttl-seconds" not in headers:
                return 400, ""
            state["tokens"] += 1
            return 200, f"token-{state['tokens']}"
        if headers.get("x-aws-ec2-metadata-token") != f"token-{state['tokens']}":
            return 401, ""
        if path != "/latest/meta-data/spot/instance-action":
            return 404, ""
        state["polls"] += 1
        if state["polls"] == expire_token_at:
            state["tokens"] += 1  # the token the watcher holds is no longer valid
            return 401, ""
        if state["polls"] <= notice_after:
            return 404, "<?xml version=\"1.0\"?><Error><Code>NotFound</Code></Error>"
        return 200, json.dumps({"action": "terminate", "time": "2026-11-30T08:22:00Z"})

    return answer


def test_aws_instance_action_sends_sigterm(serve, recipe_stand_in):
    imds = serve(aws_imds(notice_after=3, expire_token_at=2))
    said = watch(recipe_stand_in.pid, AwsNotice(imds.url), interval=0.01, max_polls=50)
    assert said == "spot instance-action terminate at 2026-11-30T08:22:00Z"
    assert recipe_stand_in.wait(timeout=30) == -signal.SIGTERM
    assert imds.polls("/latest/api/token") == 2  # the expired token was replaced
    assert imds.requests[0][:2] == ("PUT", "/latest/api/token")


def test_gcp_preempted_true_sends_sigterm(serve, recipe_stand_in):
    answers = iter(["FALSE", "FALSE", "TRUE"])

    def answer(method, path, headers):
        if headers.get("metadata-flavor") != "Google":
            return 403, "Missing Metadata-Flavor:Google header."
        if path != "/computeMetadata/v1/instance/preempted":
            return 404, ""
        return 200, next(answers, "TRUE")

    metadata = serve(answer)
    assert watch(recipe_stand_in.pid, GcpNotice(metadata.url), interval=0.01, max_polls=50) == "instance/preempted is TRUE"
    assert recipe_stand_in.wait(timeout=30) == -signal.SIGTERM
    assert metadata.polls("/instance/preempted") == 3


def azure_scheduled_events(vm_name: str):
    """Nothing, then events that are not this VM's preemption, then its Preempt."""
    def event(kind, resources, event_id):
        return {"EventId": event_id, "EventType": kind, "ResourceType": "VirtualMachine", "Resources": resources,
                "EventStatus": "Scheduled", "NotBefore": "Mon, 30 Nov 2026 08:22:30 GMT", "EventSource": "Platform",
                "Description": "", "DurationInSeconds": -1}

    documents = iter([[], [event("Preempt", ["another-vm"], "A"), event("Reboot", [vm_name], "B")],
                      [event("Preempt", [vm_name], "C")]])

    def answer(method, path, headers):
        if headers.get("metadata") != "true":
            return 400, json.dumps({"error": "Bad request. Required metadata header not specified"})
        if path.startswith("/metadata/instance/compute/name"):
            return 200, vm_name
        if path.startswith("/metadata/scheduledevents?api-version="):
            events = next(documents, [event("Preempt", [vm_name], "C")])
            return 200, json.dumps({"DocumentIncarnation": 1, "Events": events})
        return 404, ""

    return answer


def test_azure_preempt_for_this_vm_sends_sigterm(serve, recipe_stand_in):
    metadata = serve(azure_scheduled_events("spotune-node"))
    said = watch(recipe_stand_in.pid, AzureNotice(metadata.url), interval=0.01, max_polls=50)
    assert said == "scheduled event Preempt C not before Mon, 30 Nov 2026 08:22:30 GMT"
    assert recipe_stand_in.wait(timeout=30) == -signal.SIGTERM
    assert metadata.polls("/scheduledevents") == 3  # another VM's Preempt and our Reboot were not notices


def test_no_notice_while_the_recipe_runs_means_no_signal(serve, recipe_stand_in):
    imds = serve(aws_imds(notice_after=10**6))
    assert watch(recipe_stand_in.pid, AwsNotice(imds.url), interval=0.01, max_polls=5) is None
    assert recipe_stand_in.poll() is None


def test_the_watcher_ends_with_the_recipe(serve):
    imds = serve(aws_imds(notice_after=10**6))
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait(timeout=30)
    assert watch(finished.pid, AwsNotice(imds.url), interval=0.01) is None  # no max_polls: bounded by the pid


def test_an_unreachable_metadata_service_is_no_notice_yet(recipe_stand_in):
    import socket

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    assert watch(recipe_stand_in.pid, GcpNotice(url), interval=0.01, max_polls=3) is None
    assert recipe_stand_in.poll() is None


def test_command_line_watcher_signals_the_pid_it_was_given(serve, recipe_stand_in):
    metadata = serve(lambda method, path, headers: (200, "TRUE"))
    result = subprocess.run(
        [sys.executable, "-m", "recipes.spot_notice", "--pid", str(recipe_stand_in.pid), "--interval", "0.05"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "SPOTUNE_GCP_METADATA_URL": metadata.url,
             "SKYPILOT_CLUSTER_INFO": json.dumps({"cluster_name": "c", "cloud": "GCP", "region": "us-central1"})})
    assert result.returncode == 0, result.stderr
    assert recipe_stand_in.wait(timeout=30) == -signal.SIGTERM
    assert result.stderr.strip() == f"spot-notice: gcp instance/preempted is TRUE; sent SIGTERM to {recipe_stand_in.pid}"


def test_a_cloud_without_notices_is_said_and_left_alone(recipe_stand_in):
    result = subprocess.run(
        [sys.executable, "-m", "recipes.spot_notice", "--pid", str(recipe_stand_in.pid)], cwd=REPO,
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "SKYPILOT_CLUSTER_INFO": json.dumps({"cloud": "RunPod"})})
    assert result.returncode == 0
    assert result.stderr.strip() == "spot-notice: no spot notice service on runpod; nothing to watch"
    assert recipe_stand_in.poll() is None


def test_bad_arguments_are_one_line_exit_2():
    result = subprocess.run([sys.executable, "-m", "recipes.spot_notice", "--cloud", "aws"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
