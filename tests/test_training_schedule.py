"""The learning-rate schedule both training loops use."""

from __future__ import annotations

import pytest

from jobs.training import LRSchedule


def test_step_schedule_warms_up_then_decays_to_min() -> None:
    s = LRSchedule(1e-3, 1e-5, steps=1000, warmup=100)
    assert s(0) == pytest.approx(1e-5)
    assert s(99) == pytest.approx(1e-3)
    assert s(550) < s(200) < s(100)
    assert s(1000) == pytest.approx(1e-5)


def test_wall_clock_budget_ends_the_decay_by_the_deadline() -> None:
    s = LRSchedule(1e-3, 1e-5, steps=100_000, warmup=100, max_minutes=10)
    t0 = s.t0
    assert s(500, now=t0) > 9e-4  # early in steps and in time
    assert s(500, now=t0 + 300) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half the time: cosine midpoint
    assert s(500, now=t0 + 600) == pytest.approx(1e-5)
    assert s(500, now=t0 + 6000) == pytest.approx(1e-5)  # past the deadline: stays at the floor


def test_resumed_run_continues_the_schedule_and_rewarms_without_adam_state() -> None:
    plain = LRSchedule(1e-3, 1e-5, steps=1000, warmup=100, start_step=500)
    rewarm = LRSchedule(1e-3, 1e-5, steps=1000, warmup=100, start_step=500, rewarm=True)
    assert rewarm(500) == pytest.approx(plain(500) / 100)
    assert rewarm(549) == pytest.approx(plain(549) / 2)
    assert rewarm(600) == pytest.approx(plain(600))
    # A resumed timed run starts from where the step schedule had got to, not from the top.
    timed = LRSchedule(1e-3, 1e-5, steps=1000, warmup=100, max_minutes=10, start_step=550)
    assert timed(550, now=timed.t0) == pytest.approx(plain(550))
