"""SkyPilot SDK calls that never hold the watcher past a deadline.

Every SkyPilot SDK call sends a request to the API server and returns its id; `sky.get` then waits
for the result with no read timeout (sky/client/sdk.py), and a log stream (`sky.jobs.tail_logs`)
keeps looping on the server while the job is RECOVERING (sky/jobs/utils.py, stream_logs_by_id).
So each call runs in a daemon thread and the caller waits at most its deadline: on timeout the
request is cancelled on the API server where its id is known (`sky.api_cancel`, itself a
5-second POST), and the caller gets one line. A daemon thread cannot keep the CLI from exiting.

`ControllerDown` is SkyPilot's ClusterNotUpError for the jobs controller, kept apart because a
stopped controller means something (all its jobs have ended), unlike a network error.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterator, Optional

from contract.backend import BackendError, first_line

# Seconds. A status read is a database query on the controller (over SSH when it is a VM); a
# launch uploads the workdir and may have to provision the controller first.
QUEUE_TIMEOUT = 60.0
LOG_TIMEOUT = 60.0
CANCEL_TIMEOUT = 120.0
COST_REPORT_TIMEOUT = 60.0
LAUNCH_TIMEOUT = 30 * 60.0
CANCEL_REQUEST_TIMEOUT = 10.0


class SkyCallTimeout(BackendError):
    """A SkyPilot request did not answer within its deadline."""


class ControllerDown(BackendError):
    """SkyPilot's jobs controller is not up. `ended` is True where SkyPilot's own state says that
    all its jobs have ended: it was STOPPED (autostop waits for 10 idle minutes) or no longer exists."""

    def __init__(self, message: str, ended: bool):
        super().__init__(message)
        self.ended = ended


def _controller_down(e: BaseException) -> Optional[ControllerDown]:
    if not any(c.__name__ == "ClusterNotUpError" for c in type(e).__mro__):
        return None
    from sky import exceptions

    if not isinstance(e, exceptions.ClusterNotUpError):
        return None
    status = getattr(getattr(e, "cluster_status", None), "value", None)
    return ControllerDown(f"SkyPilot's jobs controller is not up ({status or 'gone'}): {first_line(e)}",
                          ended=status in (None, "STOPPED"))


def within(seconds: float, what: str, fn: Callable[[], Any], on_timeout: Callable[[], None] = lambda: None) -> Any:
    """fn() in a daemon thread; its result or its exception, or SkyCallTimeout after `seconds`."""
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the waiting caller, never lost in the thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name=f"sky-{what}", daemon=True).start()
    if not done.wait(seconds):
        on_timeout()
        raise SkyCallTimeout(f"SkyPilot {what} did not answer within {seconds:g} s; "
                             "is the API server (`sky api status`) or the jobs controller overloaded?")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class Sdk:
    """The SDK calls the SkyPilot backend makes, each bounded by a deadline."""

    def __init__(self, module: Callable[[], Any], timeouts: Optional[dict[str, float]] = None):
        self._module = module  # returns the `sky` module (imported on first use) or a test's fake
        self.timeouts = {"queue": QUEUE_TIMEOUT, "logs": LOG_TIMEOUT, "cancel": CANCEL_TIMEOUT,
                         "cost report": COST_REPORT_TIMEOUT, "launch": LAUNCH_TIMEOUT, **(timeouts or {})}
        self._log_reader: Optional[threading.Thread] = None

    @property
    def sky(self):
        return self._module()

    def _bounded(self, what: str, fn: Callable[[], Any], on_timeout: Callable[[], None] = lambda: None) -> Any:
        """fn() within timeouts[what]; a controller that is down, or any other failure, is one line."""
        try:
            return within(self.timeouts[what], what, fn, on_timeout)
        except BackendError:
            raise
        except Exception as e:
            down = _controller_down(e)
            if down is not None:
                raise down from None
            raise BackendError(f"SkyPilot {what} failed: {first_line(e)}") from None

    def request(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Send one request and wait for its result, at most timeouts[what]; failures are one line."""
        sent: dict[str, Any] = {}

        def send_and_get():
            sent["id"] = fn(*args, **kwargs)
            return self.sky.get(sent["id"])

        def cancel_on_server():
            if sent.get("id") is not None:
                try:  # best effort, and bounded too: the caller is about to be told it timed out
                    within(CANCEL_REQUEST_TIMEOUT, "api cancel", lambda: self.sky.api_cancel(sent["id"], silent=True))
                except Exception:
                    pass

        return self._bounded(what, send_and_get, cancel_on_server)

    def log_lines(self, job_id: int, *, tail: Optional[int], tail_offset: int = 0) -> list[str]:
        """Lines of the managed job's log, the last `tail` before the last `tail_offset` (all with
        tail=None). Only one read is in flight at a time: a read that outlived its deadline (the
        server loops while the job recovers) makes the next one fail at once, not pile up."""
        if self._log_reader is not None and self._log_reader.is_alive():
            raise SkyCallTimeout("SkyPilot logs: the previous log read has not returned yet")

        def read() -> list[str]:
            self._log_reader = threading.current_thread()
            kwargs = {} if tail is None else {"tail": tail, "tail_offset": tail_offset}
            chunks = self.sky.jobs.tail_logs(job_id=job_id, follow=False, preload_content=False, **kwargs)
            return list(whole_lines(chunks))

        return self._bounded("logs", read)

    def stream_log(self, job_id: int, *, follow: bool) -> Iterator[str]:
        """The job's log as it arrives, for a person reading it. Without follow, a silence longer
        than the log deadline ends it with one line (the server waits while the job recovers)."""
        import queue

        chunks: "queue.Queue[tuple[str, Any]]" = queue.Queue(maxsize=64)

        def pump() -> None:
            try:
                for chunk in self.sky.jobs.tail_logs(job_id=job_id, follow=follow, preload_content=False):
                    chunks.put(("chunk", chunk))
                chunks.put(("end", None))
            except BaseException as e:
                chunks.put(("error", e))

        threading.Thread(target=pump, name="sky-log-stream", daemon=True).start()

        def arriving() -> Iterator[Optional[str]]:
            while True:
                try:
                    kind, value = chunks.get(timeout=None if follow else self.timeouts["logs"])
                except queue.Empty:
                    raise SkyCallTimeout(f"SkyPilot logs: nothing arrived for {self.timeouts['logs']:g} s "
                                         "(the job is probably recovering; --follow waits for it)") from None
                if kind == "end":
                    return
                if kind == "error":
                    down = _controller_down(value)
                    raise (down or BackendError(f"SkyPilot logs failed: {first_line(value)}")) from None
                yield value

        yield from whole_lines(arriving())


def whole_lines(chunks) -> Iterator[str]:
    """Text chunks (which need not end on a line boundary) as lines; None ends the stream."""
    pending = ""
    for chunk in chunks:
        if chunk is None:
            break
        pending += chunk
        *complete, pending = pending.split("\n")
        yield from complete
    if pending:
        yield pending
