"""Training grids: layer patterns x depths x training budgets, each cell a normal `hyla train` run directory.

A grid is a TOML file::

    [base]                 # TrainConfig fields every run shares: data, vocab_size, tokens_per_batch, lr, ...
    tokens_per_batch = 4096
    [model]                # model fields every run shares (num_experts, block_size, ...)
    num_experts = 4
    [grid]
    pattern = ["softmax", "lightning", "hybrid:8", "hybrid:4"]
    depth = [2, 4, 8]
    steps = [100, 200]

``depth`` is the one dial that derives a model's shape (as nanochat's ``--depth``): ``depth`` layers, hidden size
``width x depth`` (``[grid] width``, default 64 channels per layer), heads of 32 channels (half as many key-value
heads), experts as wide as the hidden size. Patterns: ``softmax`` (every layer), ``lightning`` (none),
``hybrid:N`` (every ``N``-th layer softmax: MiniMax-01's 7:1 is ``hybrid:8``; needs ``depth >= N``, and
``width = 32`` keeps its 8 layers at 256 channels). Every cell is checked before the first run
starts. The runs share one tokenizer, trained once into ``OUT/tokenizer.json``.

A run whose ``report.json`` holds a complete held-out evaluation is skipped, one with a checkpoint is resumed,
one stopped before its first checkpoint starts again: an interrupted sweep continues where it stopped. The
results go to ``OUT/sweep.json``, one row per run, with its training compute as the code counts it::

    FLOPs = 6 N D + 6 L_softmax T d_q D

``N`` the active parameters without the embedding table (a token uses ``num_experts_per_tok`` experts), ``D`` the
training tokens, and for each softmax layer the attention scores and their use, forward and backward, at
``T = max_seq_len`` (an upper bound: shorter documents attend to fewer tokens), ``d_q`` the query width.
Lightning layers add no term (their state products are O(d^2) per token, inside the ``6 N D`` order).
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hyla.config import LIGHTNING, SOFTMAX, HylaConfig, preset
from hyla.data.corpus import discover
from hyla.data.shards import train_documents
from hyla.data.tokenizer import train_bpe
from hyla.errors import ConfigError
from hyla.train.loop import TrainConfig, read_toml, train, train_fields


def layer_types(pattern: str, depth: int) -> list[str]:
    """The ``depth`` layer types of ``pattern`` (``softmax``, ``lightning`` or ``hybrid:N``)."""
    if pattern == "softmax":
        return [SOFTMAX] * depth
    if pattern == "lightning":
        return [LIGHTNING] * depth
    period = pattern.removeprefix("hybrid:")
    if not pattern.startswith("hybrid:") or not period.isdigit() or int(period) < 2:
        raise ConfigError(f"pattern must be softmax, lightning or hybrid:N (N >= 2), got {pattern!r}")
    if depth < int(period):
        raise ConfigError(f"pattern {pattern} puts a softmax layer every {period} layers: depth {depth} has none")
    return [SOFTMAX if (i + 1) % int(period) == 0 else LIGHTNING for i in range(depth)]


def model_fields(pattern: str, depth: int, width: int = 64) -> dict:
    """The model fields ``depth`` derives with ``width`` channels per layer (see the module docstring)."""
    if depth < 1:
        raise ConfigError(f"depth must be >= 1 (it gives the layers and the width), got {depth}")
    if width < 32 or width % 32:
        raise ConfigError(f"width must be a positive multiple of 32 (the head size), got {width}")
    hidden, types = width * depth, layer_types(pattern, depth)
    heads = hidden // 32
    return dict(num_hidden_layers=depth, hidden_size=hidden, head_dim=32, rotary_dim=32, num_attention_heads=heads,
                num_key_value_heads=heads // 2 if heads % 2 == 0 else heads, intermediate_size=hidden,
                layer_types=types)  # fmt: skip


def scaling_parameters(config: HylaConfig) -> int:
    """``N`` of the FLOP count and of the scaling law: active parameters without the embedding table (a lookup)."""
    return config.num_parameters(active=True) - config.vocab_size * config.hidden_size


def flops(config: HylaConfig, tokens: int, seq_len: int) -> float:
    """Training compute of ``tokens`` tokens (the module docstring's formula)."""
    softmax = sum(t == SOFTMAX for t in config.layer_types)
    attention = 6 * softmax * seq_len * config.num_attention_heads * config.head_dim * tokens
    return 6 * scaling_parameters(config) * tokens + attention


@dataclass
class Cell:
    pattern: str
    depth: int
    steps: int
    name: str  # the run directory's name: hybrid8-d4-s100
    config: TrainConfig
    model: HylaConfig


def read_grid(path: str | Path, out: str | Path) -> list[Cell]:
    """Every cell of the grid file ``path``, checked (the model builds, the run config validates); runs go under
    ``out``. Raises :class:`ConfigError` naming the first problem."""
    spec = read_toml(path, "grid file")
    unknown = sorted(set(spec) - {"base", "model", "grid"})
    grid = spec.get("grid", {})
    width = grid.pop("width", 64)
    if unknown or sorted(grid) != ["depth", "pattern", "steps"]:
        raise ConfigError(f"grid file {str(path)!r} needs [grid] with pattern, depth and steps (and optional [base] "
                          f"and [model]); found sections {sorted(spec)} and grid keys {sorted(grid)}")  # fmt: skip
    base = train_fields(spec.get("base", {}), f"grid file {str(path)!r} [base]")
    for name in ("run_dir", "model", "steps", "tokenizer"):
        if name in base:
            raise ConfigError(f"[base] may not set {name}: the sweep sets it for each run")
    cells = []
    for pattern, depth, steps in itertools.product(grid["pattern"], grid["depth"], grid["steps"]):
        fields = {**spec.get("model", {}), **model_fields(pattern, depth, width)}
        name = f"{pattern.replace(':', '')}-d{depth}-s{steps}"
        try:
            model = preset("demo").replace(vocab_size=base.get("vocab_size", 384), **fields)
            config = TrainConfig(**base, model=fields, steps=steps, run_dir=str(Path(out) / "runs" / name))
        except TypeError as e:
            raise ConfigError(f"grid file {str(path)!r}: {e}") from None
        cells.append(Cell(pattern, depth, steps, name, config, model))
    return cells


def _done(run: Path) -> dict | None:
    try:
        report = json.loads((run / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return report if report.get("held_out_complete") else None


def sweep(grid: str | Path, out: str | Path, stop: threading.Event | None = None, log=print) -> list[dict]:
    """Run (or continue) the grid in ``grid`` under ``out``; returns the rows of ``out/sweep.json``. Stops after
    the current run's step when ``stop`` is set (run again to continue)."""
    cells = read_grid(grid, out)
    out, stop = Path(out), stop or threading.Event()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = out / "tokenizer.json"
    base = cells[0].config
    if not tokenizer.is_file():
        log(f"training the runs' {base.vocab_size}-id tokenizer into {tokenizer}")
        sources = discover(base.data)
        train_bpe(train_documents(sources, base.eval_fraction), base.vocab_size).save(str(tokenizer))
    rows = []
    for i, cell in enumerate(cells):
        run = Path(cell.config.run_dir)
        cell.config.tokenizer = str(tokenizer)
        report = _done(run)
        if report is None:
            resume = (run / "checkpoint" / "trainer.pt").is_file()
            log(f"[{i + 1}/{len(cells)}] {cell.name}: {'resuming' if resume else 'training'}")
            metrics = train(cell.config, resume=resume, overwrite=not resume and run.is_dir(), progress=False,
                            stop=stop)  # fmt: skip
            if metrics.get("interrupted"):
                log(f"stopped in {cell.name}; run the same command again to continue")
                break
            report = _done(run)
        else:
            log(f"[{i + 1}/{len(cells)}] {cell.name}: done before, skipped")
        if report is None:
            raise ConfigError(f"{run} finished training without a held-out report: remove {run} to run it again")
        tokens = cell.config.steps * cell.config.tokens_per_batch * cell.config.grad_accum
        rows.append({"run": cell.name, "pattern": cell.pattern, "depth": cell.depth, "steps": cell.steps,
                     "parameters": cell.model.num_parameters(), "active": cell.model.num_parameters(active=True),
                     "n": scaling_parameters(cell.model), "tokens": tokens,
                     "flops": flops(cell.model, tokens, cell.config.max_seq_len),
                     "held_out_loss": report["held_out_loss"], "config": asdict(cell.config)})  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def fit_families(rows: list[dict], bootstrap: int = 100) -> dict[str, dict]:
    """Per pattern with at least 5 runs, the law ``L(N, D)`` (:func:`hyla.train.scaling.fit`, ``N`` = ``n``,
    ``D`` = training tokens) and its compute-optimal ``(N, D, L)`` at each decade of the sweep's FLOPs."""
    from hyla.train.scaling import fit

    fits = {}
    for pattern in dict.fromkeys(r["pattern"] for r in rows):
        runs = [r for r in rows if r["pattern"] == pattern]
        if len(runs) < 5:
            continue
        law = fit([r["n"] for r in runs], [r["tokens"] for r in runs], [r["held_out_loss"] for r in runs],
                  bootstrap=bootstrap)  # fmt: skip
        decades = range(int(np.floor(np.log10(min(r["flops"] for r in rows)))),
                        int(np.ceil(np.log10(max(r["flops"] for r in rows)))) + 1)  # fmt: skip
        frontier = [dict(zip(("flops", "n", "tokens", "loss"), (10.0**c, *law.optimal(10.0**c)), strict=True))
                    for c in decades]  # fmt: skip
        fits[pattern] = {**law.to_json(), "runs": len(runs), "frontier": frontier}
    return fits


def plot(rows: list[dict], path: Path) -> Path:
    """Held-out loss against training FLOPs, one line per pattern and depth (its budgets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (pattern, depth), group in itertools.groupby(rows, key=lambda r: (r["pattern"], r["depth"])):
        group = sorted(group, key=lambda r: r["flops"])
        ax.plot([r["flops"] for r in group], [r["held_out_loss"] for r in group], marker="o",
                label=f"{pattern}, depth {depth}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(rows: list[dict]) -> str:
    lines = ["| run | parameters (active) | tokens | FLOPs | held-out loss |", "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['parameters'] / 1e6:.2f}M ({r['active'] / 1e6:.2f}M) | {r['tokens']:,} | "
              f"{r['flops']:.3g} | {r['held_out_loss']:.4f} |" for r in rows]  # fmt: skip
    return "\n".join(lines)
