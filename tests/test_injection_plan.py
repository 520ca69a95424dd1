"""The supervisor's simulated preemptions: each lands while work is left, so none can come after
the recipe finished (the supervisor signals up to a tick after it reads the step)."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from launch.supervisor import InjectionPlan


@given(count=st.integers(1, 30), total=st.integers(2, 500), seed=st.integers(0, 10_000), data=st.data())
def test_every_trigger_leaves_the_attempts_after_it_their_share_of_the_steps(count, total, seed, data):
    plan = InjectionPlan(count, seed)
    start = 0
    while plan.left > 0 and total - start >= 2:
        plan.arm(start, total)
        remaining = total - start - 1
        assert start + 1 <= plan.trigger_step <= start + max(1, remaining // (plan.left + 1))
        # The preemption resumes somewhere between the start and the trigger (SIGKILL loses work).
        start = data.draw(st.integers(start, plan.trigger_step))
        plan.left -= 1


def test_the_last_preemption_leaves_at_least_half_the_remaining_steps():
    for seed in range(500):
        plan = InjectionPlan(1, seed)
        plan.arm(10, 42)
        assert 42 - plan.trigger_step >= (42 - 10) // 2
