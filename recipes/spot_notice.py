"""Spot-notice watcher: SIGTERM to the recipe as soon as the cloud announces the node's end.

    python -m recipes.spot_notice --pid PID [--cloud auto|aws|gcp|azure] [--interval 5] [--metadata-url URL]

SkyPilot has no such watcher on VMs: without one the recipe hears of a spot reclaim only when
the VM is already going down. The clouds announce it ahead (AWS two minutes, GCP and Azure
about 30 seconds) through their instance metadata service:

- AWS, IMDSv2: PUT /latest/api/token (header X-aws-ec2-metadata-token-ttl-seconds), then GET
  /latest/meta-data/spot/instance-action with the token: 404 until an interruption is scheduled,
  then {"action": "terminate"|"stop"|"hibernate", "time": "..."}.
- GCP: GET /computeMetadata/v1/instance/preempted (header Metadata-Flavor: Google): FALSE, then TRUE.
- Azure: GET /metadata/scheduledevents?api-version=2020-07-01 (header Metadata: true): an event
  with EventType "Preempt" whose Resources name this VM (/metadata/instance/compute/name).

On notice the recipe gets SIGTERM, the same signal as a cancel: it drops the step in progress,
saves the last completed one and exits 75. The watcher polls until the notice or until the
recipe exits, whichever comes first; a poll that fails (timeout, refused, 5xx) counts as "no
notice yet". Endpoints: --metadata-url, else SPOTUNE_{AWS,GCP,AZURE}_METADATA_URL, else the
cloud's own. `--cloud auto` reads the cloud SkyPilot placed the job on (SKYPILOT_CLUSTER_INFO);
on a cloud without a notice service (RunPod, Vast, Lambda, ...) it exits at once, saying so.
Standard library only: it runs before and beside the recipe, and must not wait on torch.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Optional

DEFAULT_URLS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal",
                "azure": "http://169.254.169.254"}
ENV_URLS = {cloud: f"SPOTUNE_{cloud.upper()}_METADATA_URL" for cloud in DEFAULT_URLS}
REQUEST_SECONDS = 2.0
AWS_TOKEN_TTL_SECONDS = 21600
# Metadata endpoints are link-local: never send these requests through an HTTP proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Http:
    def __init__(self, base: str):
        self.base = base.rstrip("/")

    def request(self, path: str, headers: dict[str, str], method: str = "GET") -> tuple[int, str]:
        """(status, body); an HTTP error status is returned, a network failure raises OSError."""
        req = urllib.request.Request(self.base + path, headers=headers, method=method)
        try:
            with _OPENER.open(req, timeout=REQUEST_SECONDS) as response:
                return response.status, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")


class AwsNotice(_Http):
    cloud = "aws"

    def __init__(self, base: str):
        super().__init__(base)
        self._token: Optional[str] = None

    def poll(self) -> Optional[str]:
        if self._token is None:
            status, body = self.request("/latest/api/token", {
                "X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_SECONDS)}, method="PUT")
            if status != 200:
                return None
            self._token = body.strip()
        status, body = self.request("/latest/meta-data/spot/instance-action",
                                    {"X-aws-ec2-metadata-token": self._token})
        if status == 401:  # the token expired: a new one on the next poll
            self._token = None
            return None
        if status != 200:
            return None  # 404: no interruption scheduled
        try:
            action = json.loads(body)
        except ValueError:
            return None
        return f"spot instance-action {action.get('action')} at {action.get('time')}"


class GcpNotice(_Http):
    cloud = "gcp"

    def poll(self) -> Optional[str]:
        status, body = self.request("/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"})
        return "instance/preempted is TRUE" if status == 200 and body.strip().upper() == "TRUE" else None


class AzureNotice(_Http):
    cloud = "azure"

    def __init__(self, base: str):
        super().__init__(base)
        self._vm_name: Optional[str] = None

    def poll(self) -> Optional[str]:
        headers = {"Metadata": "true"}
        if self._vm_name is None:
            status, body = self.request("/metadata/instance/compute/name?api-version=2021-02-01&format=text", headers)
            if status == 200 and body.strip():
                self._vm_name = body.strip()
        status, body = self.request("/metadata/scheduledevents?api-version=2020-07-01", headers)
        if status != 200:
            return None
        try:
            events = json.loads(body).get("Events") or []
        except (ValueError, AttributeError):
            return None
        for event in events:
            # Events reach every VM of an availability set; only those naming this VM are ours.
            ours = self._vm_name is None or self._vm_name in (event.get("Resources") or [])
            if event.get("EventType") == "Preempt" and ours:
                return f"scheduled event Preempt {event.get('EventId')} not before {event.get('NotBefore')}"
        return None


NOTICES = {"aws": AwsNotice, "gcp": GcpNotice, "azure": AzureNotice}


def metadata_url(cloud: str, override: Optional[str] = None) -> str:
    return override or os.environ.get(ENV_URLS[cloud]) or DEFAULT_URLS[cloud]


def skypilot_cloud() -> Optional[str]:
    """The cloud SkyPilot launched this node on, from SKYPILOT_CLUSTER_INFO; None if not there."""
    try:
        cloud = str(json.loads(os.environ.get("SKYPILOT_CLUSTER_INFO", "")).get("cloud", "")).lower()
    except (ValueError, AttributeError):
        return None
    return cloud or None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch(pid: int, notice, interval: float = 5.0, max_polls: Optional[int] = None,
          sleep: Callable[[float], None] = time.sleep) -> Optional[str]:
    """Poll `notice` until it reports, then SIGTERM `pid` and return what it said. Returns None
    when `pid` exits first (or after `max_polls` polls)."""
    polls = 0
    while _alive(pid) and (max_polls is None or polls < max_polls):
        polls += 1
        try:
            said = notice.poll()
        except OSError:  # unreachable, refused, timed out: no notice yet
            said = None
        if said:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return said
            print(f"spot-notice: {notice.cloud} {said}; sent SIGTERM to {pid}", file=sys.stderr, flush=True)
            return said
        sleep(interval)
    return None


class _OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (usage: python -m recipes.spot_notice --pid PID)", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    p = _OneLineArgumentParser(prog="python -m recipes.spot_notice", description=__doc__.splitlines()[0])
    p.add_argument("--pid", type=int, required=True, help="the process to send SIGTERM (the recipe, or torchrun)")
    p.add_argument("--cloud", choices=["auto", *NOTICES], default="auto",
                   help="whose metadata service to poll (auto: the cloud in SKYPILOT_CLUSTER_INFO)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls (AWS advises 5)")
    p.add_argument("--metadata-url", default=None, help="the metadata service's base URL (tests, proxies)")
    args = p.parse_args(argv)
    if args.interval <= 0:
        p.error("--interval must be positive")
    cloud = skypilot_cloud() if args.cloud == "auto" else args.cloud
    if cloud not in NOTICES:
        print(f"spot-notice: no spot notice service on {cloud or 'this machine'}; nothing to watch",
              file=sys.stderr)
        return 0
    watch(args.pid, NOTICES[cloud](metadata_url(cloud, args.metadata_url)), interval=args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
