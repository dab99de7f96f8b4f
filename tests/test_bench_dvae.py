"""bench/dvae.py's clock-driven schedule: a budgeted run ends both phases and both LR cosines on time."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_dvae", Path(__file__).parents[1] / "bench" / "dvae.py")
bench_dvae = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_dvae)
clock_schedule = bench_dvae.clock_schedule


def test_clock_schedule_splits_the_budget_by_timed_step_cost():
    steps, hard, step_s, seconds = 1000, 760, (0.16, 0.08), 300.0
    planned = clock_schedule(steps, hard, step_s, seconds)
    t_relaxed = 760 * 0.16 / (760 * 0.16 + 240 * 0.08) * seconds  # the relaxed phase's share of the time
    assert planned(0.0) == 0
    assert planned(t_relaxed - 1e-6) == hard - 1
    assert planned(t_relaxed) == hard  # the decoder-only phase starts on time...
    assert planned(seconds - 1e-6) == steps - 1
    assert planned(seconds) == steps  # ...and the plan is over when the time is
    grid = [planned(seconds * i / 997) for i in range(998)]
    assert grid == sorted(grid)


def test_clock_schedule_without_a_decoder_only_phase_is_linear_in_time():
    planned = clock_schedule(500, None, (0.1, 0.1), 50.0)
    assert [planned(t) for t in (0.0, 25.0, 49.99, 50.0)] == [0, 250, 499, 500]


def test_explicit_steps_run_step_by_step():
    assert clock_schedule(500, 400, None, 60.0) is None
