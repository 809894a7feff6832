"""The benchmark helpers' bookkeeping (nothing here is timed against anything)."""

from hyla.bench import run_times


def test_run_times_warms_up_once_then_times_each_call():
    calls = []
    times = run_times(lambda: calls.append(None), 4)
    assert len(calls) == 5 and len(times) == 4 and all(t >= 0 for t in times)
