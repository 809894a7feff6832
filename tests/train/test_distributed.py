"""FSDP2 across processes: ``torchrun`` with 2 CPU ranks (gloo) trains exactly like one process."""

import json
import subprocess
import sys

import pytest
import torch

import hyla
from tests.helpers import small_corpus


def train_args(tmp_path, run: str) -> list[str]:
    return ["train", "--preset", "tiny", "--run-dir", str(tmp_path / run), "--data", str(tmp_path / "corpus"),
            "--vocab-size", "300",
            "--steps", "4", "--tokens-per-batch", "256", "--max-seq-len", "64", "--grad-accum", "4", "--warmup", "1",
            "--eval-every", "2", "--eval-batches", "2", "--checkpoint-every", "100", "--eval-fraction", "0.1",
            "--cache-dir", str(tmp_path / "cache"), "--lr", "1e-2",
            "--set", "hidden_size=32", "--set", "intermediate_size=32", "--set", "num_attention_heads=2",
            "--set", "num_key_value_heads=1"]  # fmt: skip


def metrics(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in lines]


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    small_corpus(tmp_path / "corpus", n=40)
    one = subprocess.run([sys.executable, "-m", "hyla", *train_args(tmp_path, "one")],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hyla"]
    two = subprocess.run([*launcher, *train_args(tmp_path, "two")], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    single, sharded = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in sharded] == [1, 2, 3, 4] and [m["tokens"] for m in sharded] == [
        m["tokens"] for m in single
    ]
    for a, b in zip(single, sharded, strict=True):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    # The sharded run's checkpoint holds the whole model, equal to the single process's.
    w1 = hyla.load(tmp_path / "one" / "checkpoint" / "model").state_dict()
    w2 = hyla.load(tmp_path / "two" / "checkpoint" / "model").state_dict()
    assert all(torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6) for k in w1)


@pytest.mark.slow
def test_a_sweep_under_torchrun_equals_one_process(tmp_path):
    """`torchrun -m hyla sweep`: the ranks share one process group across the grid's runs, rank 0 writes the
    files; every run's held-out loss equals the single process's."""
    from tests.helpers import grid_file

    path = grid_file(tmp_path, '[grid]\npattern = ["lightning", "hybrid:2"]\ndepth = [2]\nsteps = [2]\n')
    path.write_text(path.read_text().replace("[base]\n", "[base]\ngrad_accum = 2\n"))
    args = ["-m", "hyla", "sweep", str(path), "--out"]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run([*launcher, *args, str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("| lightning-d2-s2 |") == 1  # one table: rank 0 reports
    single, sharded = (json.loads((tmp_path / d / "sweep.json").read_text()) for d in ("one", "two"))
    assert [r["run"] for r in sharded] == [r["run"] for r in single] == ["lightning-d2-s2", "hybrid2-d2-s2"]
    for a, b in zip(single, sharded, strict=True):
        assert b["held_out_loss"] == pytest.approx(a["held_out_loss"], rel=1e-5)
