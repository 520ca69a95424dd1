"""The one fake backend, shared by the watch tests and bench/bench_ledger.py: its poll reports the
same observation every time, so what a watch tick does is the ledger's work alone."""
from __future__ import annotations

from contract.backend import Observation


class FixedBackend:
    name = "fixed"
    poll_seconds = 1.0
    max_nodes = 1

    def __init__(self, observation: Observation):
        self.observation = observation

    def poll(self, external_id: str) -> Observation:
        return self.observation

    def cancel(self, external_id: str, graceful: bool = True) -> None:
        raise AssertionError("a job on the fixed backend is kept within its budget: nothing should cancel it")
