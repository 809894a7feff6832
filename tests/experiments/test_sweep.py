"""hyla sweep: a grid of real (seconds-long) runs, skipped when done, resumed when stopped, checked up front."""

import json
import threading

import pytest

from hyla.config import LIGHTNING, SOFTMAX
from hyla.errors import ConfigError
from hyla.experiments.sweep import flops, layer_types, plot, read_grid, sweep, table
from tests.helpers import SWEEP_BASE, grid_file


def test_layer_patterns_and_the_depth_dial():
    assert layer_types("hybrid:4", 8) == [LIGHTNING] * 3 + [SOFTMAX] + [LIGHTNING] * 3 + [SOFTMAX]
    assert layer_types("softmax", 2) == [SOFTMAX] * 2 and layer_types("lightning", 3) == [LIGHTNING] * 3
    with pytest.raises(ConfigError, match="depth 4 has none"):
        layer_types("hybrid:8", 4)
    with pytest.raises(ConfigError, match="hybrid:N"):
        layer_types("hybrid", 4)
    # letters name a period, first layer first, repeated to the depth
    assert layer_types("SL", 4) == [SOFTMAX, LIGHTNING] * 2
    assert layer_types("LLLS", 8) == layer_types("hybrid:4", 8)
    assert layer_types("SLLLLLLL", 8) == [SOFTMAX] + [LIGHTNING] * 7
    with pytest.raises(ConfigError, match="not a multiple"):
        layer_types("SLL", 4)
    with pytest.raises(ConfigError, match="letters L/S"):
        layer_types("SLx", 3)


def test_the_width_setting_narrows_every_depth(tmp_path):
    grid = '[grid]\npattern = ["hybrid:8"]\ndepth = [8]\nsteps = [3]\nwidth = 32\n'
    (cell,), task = read_grid(grid_file(tmp_path, grid), tmp_path / "out")
    m = cell.model
    assert (m.num_hidden_layers, m.hidden_size, m.num_attention_heads, m.num_key_value_heads) == (8, 256, 8, 4)
    assert m.layer_types == [LIGHTNING] * 7 + [SOFTMAX] and task is None and cell.name == "hybrid8-d8-s3"
    cells, _ = read_grid(grid_file(tmp_path, grid.replace("width = 32", "width = [16, 24]")), tmp_path / "out")
    assert [(c.name, c.model.hidden_size, c.model.num_attention_heads) for c in cells] == [
        ("hybrid8-d8-w16-s3", 128, 4), ("hybrid8-d8-w24-s3", 192, 6)]  # fmt: skip
    with pytest.raises(ConfigError, match="multiple of 32"):
        read_grid(grid_file(tmp_path, grid.replace("width = 32", "width = 6")), tmp_path / "out")


def test_flops_count_active_parameters_and_softmax_attention(tmp_path):
    (cell_l, cell_s), _ = read_grid(grid_file(tmp_path, '[grid]\npattern = ["lightning", "softmax"]\ndepth = [2]\n'
                                           "steps = [3]\n"), tmp_path / "out")  # fmt: skip
    m = cell_l.model
    expected = 6 * (m.num_parameters(active=True) - m.vocab_size * m.hidden_size) * 1000
    assert flops(m, 1000, 64) == expected
    s = cell_s.model
    attention = 6 * 2 * 64 * s.num_attention_heads * s.head_dim * 1000  # two softmax layers at T = 64
    assert flops(s, 1000, 64) == 6 * (s.num_parameters(active=True) - s.vocab_size * s.hidden_size) * 1000 + attention


@pytest.mark.slow
def test_a_grid_runs_skips_what_is_done_and_resumes_what_stopped(tmp_path):
    path = grid_file(tmp_path, '[grid]\npattern = ["lightning", "hybrid:2"]\ndepth = [2]\nsteps = [2, 3]\n')
    out = tmp_path / "out"
    stop = threading.Event()
    lines = []

    def log(line):
        lines.append(line)
        if line.startswith("[2/4]"):
            stop.set()  # Ctrl-C while the second run starts: it stops after its first step

    rows = sweep(path, out, stop, log)
    assert [r["run"] for r in rows] == ["lightning-d2-s2"] and "run the same command again" in lines[-1]
    assert not (out / "runs" / "lightning-d2-s3" / "report.json").exists()
    lines.clear()
    rows = sweep(path, out, None, lines.append)
    assert lines[0] == "[1/4] lightning-d2-s2: done before, skipped"
    assert lines[1] == "[2/4] lightning-d2-s3: resuming"
    assert [r["run"] for r in rows] == ["lightning-d2-s2", "lightning-d2-s3", "hybrid2-d2-s2", "hybrid2-d2-s3"]
    saved = json.loads((out / "sweep.json").read_text())
    assert [r["held_out_loss"] for r in saved] == [r["held_out_loss"] for r in rows]
    for r in rows:
        report = json.loads((out / "runs" / r["run"] / "report.json").read_text())
        assert report["held_out_loss"] == r["held_out_loss"] and r["tokens"] == r["steps"] * 256
    train = json.loads((out / "runs" / "hybrid2-d2-s3" / "train.json").read_text())
    assert train["model"]["layer_types"] == [LIGHTNING, SOFTMAX] and train["tokenizer"] == str(out / "tokenizer.json")
    lines.clear()
    sweep(path, out, None, lines.append)  # everything done: nothing trains
    assert all(line.endswith("done before, skipped") for line in lines)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ('[grid]\npattern = ["hybrid:8"]\ndepth = [2]\nsteps = [3]\n', "depth 2 has none"),
        ('[grid]\npattern = ["softmax"]\ndepth = [0]\nsteps = [3]\n', "depth must be >= 1"),
        ('[grid]\npattern = ["softmax"]\ndepth = [1]\n', r"needs \[grid\] \(or several \[\[grid\]\]\) with"),
        ('[grid]\npattern = ["softmax"]\ndepth = [1]\nsteps = [0]\n', "steps"),
    ],
)
def test_a_grid_that_cannot_work_is_refused_before_any_run(tmp_path, grid, message):
    with pytest.raises(ConfigError, match=message):
        sweep(grid_file(tmp_path, grid), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_command_prints_the_table_and_writes_json_and_png(tmp_path):
    import subprocess
    import sys

    path = grid_file(tmp_path, '[grid]\npattern = ["hybrid:2"]\ndepth = [2]\nsteps = [2]\n')
    cmd = [sys.executable, "-m", "hyla", "sweep", str(path), "--out", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| hybrid2-d2-s2 |" in out.stdout and (tmp_path / "out" / "sweep.png").is_file()
    path.write_text(path.read_text().replace("depth = [2]", "depth = [1]"))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "hyla: error: pattern hybrid:2" in out.stderr and "Traceback" not in out.stderr


def test_families_with_five_runs_or_more_get_a_law_and_a_frontier():
    from hyla.experiments.scaling import Fit
    from hyla.experiments.sweep import fit_families

    law = Fit(E=2.0, A=50.0, B=300.0, alpha=0.4, beta=0.3)
    rows = [{"pattern": "hybrid:8", "n": n, "tokens": d, "held_out_loss": float(law.loss(n, d)), "flops": 6 * n * d}
            for n in (1e4, 4e4, 1.6e5) for d in (1e6, 4e6, 1.6e7)]  # fmt: skip
    rows += [{"pattern": "softmax", "n": 1e4, "tokens": 1e6, "held_out_loss": 3.0, "flops": 6e10}]  # too few runs
    fits = fit_families(rows, bootstrap=5)
    assert list(fits) == ["hybrid:8"] and fits["hybrid:8"]["runs"] == 9
    hybrid = fits["hybrid:8"]
    assert hybrid["alpha"] == pytest.approx(0.4, rel=0.05) and hybrid["E"] == pytest.approx(2.0, rel=0.02)
    assert hybrid["floor_identified"]
    frontier = hybrid["frontier"]
    assert [f["flops"] for f in frontier] == [10.0**c for c in range(10, 15)]  # the decades around 6e10..1.5e13
    assert all(6 * f["n"] * f["tokens"] == pytest.approx(f["flops"]) for f in frontier)


TASK = """
[task]
name = "mqar"
vocab = 8
lengths = [16, 32]
pairs = [2, 4]
documents = 60
contexts = 2
queries = 2
"""


@pytest.mark.slow
def test_a_recall_grid_trains_on_mqar_and_asks_each_model(tmp_path):
    text = SWEEP_BASE.replace('data = "{data}"\n', "").replace("vocab_size = 300\n", "")
    path = tmp_path / "grid.toml"
    path.write_text(text.format(cache=tmp_path / "cache") + TASK + '[grid]\npattern = ["lightning", "softmax"]\n'
                    "depth = [1]\nwidth = 32\nsteps = [2]\n")  # fmt: skip
    out, lines = tmp_path / "out", []
    rows = sweep(path, out, None, lines.append)
    assert (out / "tokenizer.json").is_file() and len((out / "data" / "mqar.jsonl").read_text().splitlines()) == 60
    for row in rows:
        grid = json.loads((out / "runs" / row["run"] / "eval" / "mqar.json").read_text())
        assert row["mqar"]["accuracy"] == grid["accuracy"] and grid["trials"] == [[4, 4], [4, 4]]
        assert row["mqar"]["mean"] == sum(map(sum, grid["correct"])) / 16 and grid["chance"] == 1 / 8
        train = json.loads((out / "runs" / row["run"] / "train.json").read_text())
        assert train["data"] == str(out / "data" / "mqar.jsonl") and row["config"]["vocab_size"] == 25
    assert sum(line.startswith("  asking") for line in lines) == 2
    for row in rows:  # probed too: the embedding and the layer, the softmax layer with its attention per head
        layers = row["probe"]["layers"]
        assert [p["kind"] for p in layers] == ["embedding", "softmax" if "softmax" in row["run"] else "lightning"]
        assert (layers[1]["to_value"] is not None) == ("softmax" in row["run"])
        assert (out / "runs" / row["run"] / "eval" / "probe.md").is_file()
    lines.clear()
    again = sweep(path, out, None, lines.append)  # done: neither trained nor asked again
    assert [r["mqar"] for r in again] == [r["mqar"] for r in rows] and not any("asking" in line for line in lines)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('name = "mqar"', 'name = "copy"'), r"needs name = one of \['mqar', 'passkey'\]"),
        (("vocab = 8", "vocab = 3"), "4 pairs need as many distinct keys"),
        (("documents = 60", "documents = 60\nlength = 3"), "unexpected keyword argument 'length'"),
        (("max_seq_len = 64", "max_seq_len = 32"), "max_seq_len must hold the longest mqar document, 33 tokens"),
        (("[base]", '[base]\ndata = "x"'), "may not set data"),
    ],
)
def test_a_recall_task_that_cannot_work_is_refused(tmp_path, change, message):
    text = (SWEEP_BASE.replace('data = "{data}"\n', "").replace("vocab_size = 300\n", "").format(cache=tmp_path) + TASK
            + '[grid]\npattern = ["softmax"]\ndepth = [1]\nwidth = 32\nsteps = [2]\n')  # fmt: skip
    path = tmp_path / "grid.toml"
    path.write_text(text.replace(*change))
    with pytest.raises(ConfigError, match=message):
        read_grid(path, tmp_path / "out")


PASSKEY = """
[task]
name = "passkey"
lengths = [96]
documents = 40
scales = [1, 2]
depths = [0.0, 1.0]
trials = 2
"""


@pytest.mark.slow
def test_a_passkey_grid_trains_at_one_length_and_asks_at_several(tmp_path):
    text = SWEEP_BASE.replace('data = "{data}"\n', "").replace("vocab_size = 300\n", "").replace("64", "112")
    path = tmp_path / "grid.toml"
    path.write_text(text.format(cache=tmp_path / "cache") + PASSKEY + '[grid]\npattern = ["SL"]\n'
                    "depth = [2]\nwidth = 16\nsteps = [2]\n")  # fmt: skip
    out = tmp_path / "out"
    rows = sweep(path, out, None, lambda line: None)
    assert len((out / "data" / "passkey.jsonl").read_text().splitlines()) == 40
    grid = json.loads((out / "runs" / "SL-d2-s2" / "eval" / "passkey.json").read_text())
    assert grid["length"] == [96, 192] and grid["depth"] == [0.0, 1.0] and grid["trials"] == [[2, 2], [2, 2]]
    assert rows[0]["passkey"]["mean"] == sum(map(sum, grid["correct"])) / 8 and "probe" not in rows[0]
    assert plot(rows, tmp_path / "sweep.png").stat().st_size > 0 and "passkey accuracy" in table(rows)


def test_a_passkey_grid_whose_model_cannot_hold_the_longest_prompt_is_refused(tmp_path):
    text = SWEEP_BASE.replace('data = "{data}"\n', "").replace("vocab_size = 300\n", "").replace("64", "112")
    path = tmp_path / "grid.toml"
    path.write_text(text.format(cache=tmp_path / "cache") + "max_position_embeddings = 100\n" + PASSKEY
                    + '[grid]\npattern = ["SL"]\ndepth = [2]\nwidth = 16\nsteps = [2]\n')  # fmt: skip
    with pytest.raises(ConfigError, match="prompts of up to 208 tokens; set \\[model\\] max_position_embeddings"):
        read_grid(path, tmp_path / "out")


def test_several_grid_tables_run_in_one_sweep(tmp_path):
    grids = ('[[grid]]\npattern = ["SL"]\ndepth = [2]\nwidth = 32\nsteps = [2]\n'
             '[[grid]]\npattern = ["SLLL", "LLLS"]\ndepth = [4]\nwidth = 16\nsteps = [2]\n')  # fmt: skip
    cells, _ = read_grid(grid_file(tmp_path, grids), tmp_path / "out")
    assert [c.name for c in cells] == ["SL-d2-w32-s2", "SLLL-d4-w16-s2", "LLLS-d4-w16-s2"]
    assert cells[1].model.layer_types == [SOFTMAX] + [LIGHTNING] * 3 and cells[1].model.hidden_size == 64
    twice = grids + '[[grid]]\npattern = ["SL"]\ndepth = [2]\nwidth = 32\nsteps = [2]\n'
    with pytest.raises(ConfigError, match="names the run SL-d2-w32-s2 twice"):
        read_grid(grid_file(tmp_path, twice), tmp_path / "out")
