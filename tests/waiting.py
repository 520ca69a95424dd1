"""Polling for tests that watch real processes: wait for a condition, fail loudly on timeout."""
import time


def wait_until(predicate, timeout: float = 300, every: float = 0.2):
    """The first truthy value of predicate(), polled every `every` seconds for up to `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")
