"""A real Ray cluster on loopback for a test module: a head and worker nodes, each its own
`ray start` process tree capped to one CPU, so Ray Train's workers land on different nodes.

Each node gets its own short --temp-dir (Ray's socket paths have a length limit) and its own ports:
two raylets on one IP must not share the dashboard agent's, the runtime env agent's or the metrics
port."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]


@dataclass
class RayCluster:
    gcs_address: str = ""
    dashboard: str = ""
    processes: list = field(default_factory=list)
    logs: list = field(default_factory=list)

    def start(self, worker_nodes: int = 0, timeout: float = 180) -> "RayCluster":
        # Ray turns token auth on by itself where ~/.ray/auth_token exists (another Ray on this
        # machine left one): this cluster and this process's clients agree to go without.
        self._auth_mode = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = "disabled"
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        port, dashboard = free_port(), free_port()
        self.gcs_address, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"
        self._spawn(["--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                     str(dashboard), "--include-dashboard", "true"], env)
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + timeout
        while True:
            try:
                if len(self.processes) == 1:  # a worker node joins a head that answers, not before
                    JobSubmissionClient(self.dashboard).list_jobs()
                    for _ in range(worker_nodes):
                        self._spawn(["--address", self.gcs_address], env)
                if len(self.alive_nodes()) == 1 + worker_nodes:
                    return self
            except Exception:
                pass
            if time.time() > deadline or any(p.poll() is not None for p in self.processes):
                self.stop()
                said = "\n".join(log.read_text()[-1500:] for log in self.logs if log.exists())
                raise RuntimeError(f"the local Ray cluster did not come up within {timeout:.0f} s:\n{said}")
            time.sleep(2)

    def _spawn(self, args: list[str], env: dict) -> None:
        temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
        log = Path(temp_dir) / "start.log"  # what `ray start` said: the error when a node does not come up
        self.logs.append(log)
        with open(log, "w") as out:
            self.processes.append(subprocess.Popen(
                [RAY, "start", "--block", "--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1",
                 "--temp-dir", temp_dir, "--disable-usage-stats", *_node_ports(), *args],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True))

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard, raise_on_missing_output=False) if n.state == "ALIVE"]

    def stop(self) -> None:
        for process in reversed(self.processes):  # workers first, the head last
            try:
                os.killpg(process.pid, signal.SIGTERM)  # the node and what it started, nothing else
            except ProcessLookupError:
                continue
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        if getattr(self, "_auth_mode", None) is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = self._auth_mode
