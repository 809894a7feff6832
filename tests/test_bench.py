"""The benchmark helpers' bookkeeping (nothing here is timed against anything)."""

from hyla.bench import run_times


def test_run_times_warms_up_once_then_times_each_call():
    calls = []
    times = run_times(lambda: calls.append(None), 4)
    assert len(calls) == 5 and len(times) == 4 and all(t >= 0 for t in times)


def test_append_result_adds_one_dated_section(tmp_path):
    import datetime

    from hyla.bench import append_result

    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n")
    append_result(path, "Serving, tiny", "Machine: m.", "python x.py --n 1", "| a |\n|---|")
    expected = (
        f"# Results\n\n### Serving, tiny — {datetime.date.today()}\n\n"
        "Machine: m.\nCommand: `python x.py --n 1`\n\n| a |\n|---|\n"
    )
    assert path.read_text() == expected
