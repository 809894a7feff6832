"""``hyla sweep``: a grid of training runs (layer patterns x depths x budgets), resumable, with scaling fits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hyla.cli.common import is_main_rank, stop_on_signals


def add_parsers(commands: argparse._SubParsersAction) -> None:
    sw = commands.add_parser("sweep", help="train a grid of runs: layer patterns x depths x budgets",
                             description="Train every cell of a grid file (TOML: [base] run fields, [model] "
                             "model fields, [grid] pattern = [softmax, lightning, hybrid:N, or letters L/S such as "
                             "SLLL], depth = [...], steps = [...], optional width (or several [[grid]]); optional "
                             "[task] name = \"mqar\" or \"passkey\" to train on recall; see "
                             "hyla/experiments/sweep.py) as a `hyla train` run under OUT/runs, skipping finished "
                             "runs and resuming interrupted ones (under torchrun each run trains sharded); prints a "
                             "table and writes OUT/sweep.json, OUT/sweep.png and, with five runs of a pattern, "
                             "OUT/fits.json.")  # fmt: skip
    sw.add_argument("grid", help="the grid file (TOML)")
    sw.add_argument("--out", required=True, help="the sweep's directory (runs, tokenizer, results)")
    sw.set_defaults(run=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    """``hyla sweep``: a grid of runs; Ctrl-C stops after the step, the same command continues."""
    from hyla.experiments import sweep

    with stop_on_signals("stopping after this step") as stop:
        rows = sweep.sweep(args.grid, args.out, stop, log=lambda line: print(line, flush=True))
    if stop.is_set():
        return 130
    if not is_main_rank():  # under torchrun, rank 0 reports
        return 0
    out = Path(args.out)
    fits = {} if {"mqar", "passkey"} & set(rows[0]) else sweep.fit_families(rows)
    print(f"\n{sweep.table(rows)}\n\nwrote {out / 'sweep.json'} and {sweep.plot(rows, out / 'sweep.png', fits)}")
    if fits:
        (out / "fits.json").write_text(json.dumps(fits, indent=1) + "\n")
        for pattern, law in fits.items():
            ci = {p: "[{:.3g}, {:.3g}]".format(*law["intervals"][p]) for p in ("E", "alpha", "beta")}
            print(f"{pattern}: L = {law['E']:.3f} {ci['E']} + {law['A']:.3g}/N^{law['alpha']:.3f} {ci['alpha']} "
                  f"+ {law['B']:.3g}/D^{law['beta']:.3f} {ci['beta']} ({law['runs']} runs)")  # fmt: skip
            if not law["floor_identified"]:
                print(f"  {pattern}: the fitted floor E is at its bound (0): these runs are too far from convergence "
                      "to identify it, so the law and its frontier extrapolate; train longer or larger")  # fmt: skip
        print(f"wrote {out / 'fits.json'} (the laws, 95% bootstrap intervals and compute-optimal N, D per decade)")
    return 0
