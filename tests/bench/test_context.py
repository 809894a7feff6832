"""The benchmark helpers' bookkeeping (nothing here is timed against anything)."""

import datetime

from hyla.bench import append_result, context, run_times


def test_run_times_warms_up_once_then_times_each_call(monkeypatch):
    """A fake clock that each call of ``fn`` advances by its own length: the warm-up call (100 s) is in no time,
    and each timed call reports its own length (nothing real is timed)."""
    import hyla.bench as bench

    now, lengths = [0.0], iter([100.0, 1.0, 2.0, 3.0, 4.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])

    def call() -> None:
        now[0] += next(lengths)

    assert run_times(call, 4) == [1.0, 2.0, 3.0, 4.0]


def test_append_result_adds_one_dated_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n")
    append_result(path, "Serving, tiny", "Machine: m.", "python x.py --n 1", "| a |\n|---|")
    expected = (
        f"# Results\n\n### Serving, tiny — {datetime.date.today()}\n\n"
        "Machine: m.\nCommand: `python x.py --n 1`\n\n| a |\n|---|\n"
    )
    assert path.read_text() == expected


def test_bench_context_writes_table_plot_and_a_rerunnable_command(tmp_path):
    """End to end on tiny lengths (one not a multiple of the block): every column measured, the plot drawn, and
    the recorded command carries every option that shaped the run."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n")
    context.main([64, 100], "cpu", "float32", 64, 2, 1, True, tmp_path / "out", results)
    text = results.read_text()
    assert (tmp_path / "out" / "context.png").stat().st_size > 0
    command = "`hyla bench context --device cpu --dtype float32 --lengths 64 100 --hidden 64 --heads 2 --repeats 1`"
    assert command in text and command in (tmp_path / "out" / "context.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 64 ") or line.startswith("| 100 ")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # Only the whole model's and the projections' forward + backward are not measured (dashes); every other
        # cell is a number.
        assert cells.count("—") == 2 and all(float(c.replace(",", "")) >= 0 for c in cells if c != "—")


def test_training_benchmark_ceiling_skips_only_the_lightning_op(monkeypatch):
    """``benchmarks/train.py --ceiling``: the step runs with the op replaced (never called), which is restored."""
    import importlib.util
    from pathlib import Path

    import torch

    import hyla
    import hyla.model.lightning

    spec = importlib.util.spec_from_file_location("train_bench", Path(__file__).parents[2] / "benchmarks/train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    real = hyla.model.lightning.lightning_attention_qkv

    def counted(*args, **kwargs):
        calls.append(None)
        return real(*args, **kwargs)

    monkeypatch.setattr(hyla.model.lightning, "lightning_attention_qkv", counted)
    model = hyla.HylaForCausalLM(hyla.preset("tiny")).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    before = [p.detach().clone() for p in model.parameters()]
    bench.free_lightning(bench.step_fn(model, ids, hf=False))()
    assert not calls and hyla.model.lightning.lightning_attention_qkv is counted
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))  # it trained
    bench.step_fn(model, ids, hf=False)()
    assert len(calls) == sum(layer.is_lightning for layer in model.model.layers)
