"""Polling and seeds for tests that watch real processes."""
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


def early_preemption_seed(total_steps: int) -> int:
    """A seed whose simulated preemption comes at step 1 or 2: before a fast machine could finish."""
    from launch.supervisor import InjectionPlan

    for seed in range(1000):
        plan = InjectionPlan(1, seed)
        plan.arm(0, total_steps)
        if plan.trigger_step <= 2:
            return seed
    raise AssertionError("no such seed")
