"""Training grids: layer patterns x depths x widths x training budgets, each cell a normal `hyla train` run.

A grid is a TOML file::

    [base]                 # TrainConfig fields every run shares: data, vocab_size, tokens_per_batch, lr, ...
    tokens_per_batch = 4096
    [model]                # model fields every run shares (num_experts, block_size, ...)
    num_experts = 4
    [grid]
    pattern = ["softmax", "lightning", "hybrid:8", "hybrid:4"]
    depth = [2, 4, 8]
    steps = [100, 200]
    width = 64             # optional: channels per layer, one value or a list (a second size dial)

Several ``[[grid]]`` tables in one file (instead of one ``[grid]``) run one after the other, each its own product:
cells that do not form a product (``SL`` at depth 2 and ``SLLL`` at depth 4) share one sweep and one ``sweep.json``.
    [task]                 # optional: train on a synthetic task instead of [base] data (the recall study)
    name = "mqar"
    vocab = 64             # ids per third: keys, values, filler
    lengths = [64, 128, 256]
    pairs = [4, 8, 16, 32]
    documents = 20000

``depth`` is the dial that derives a model's shape (as nanochat's ``--depth``): ``depth`` layers, hidden size
``width x depth`` (``width`` channels per layer, default 64; the product a multiple of 32), heads of 32 channels
(half as many key-value heads), experts as wide as the hidden size; at ``depth = 8`` the widths 8, 12, 16, 24
give hidden sizes 64 to 192, as in the scaling study. Patterns: ``softmax`` (every layer), ``lightning`` (none),
``hybrid:N`` (every ``N``-th layer softmax: MiniMax-01's 7:1 is ``hybrid:8``; needs ``depth >= N``), or letters
naming a period of layers, first layer first, repeated to ``depth`` (``SL``: softmax then lightning;
``SLLLLLLL``: MiniMax's 7:1 with its softmax layer moved to the front). Every
cell is checked before the first run starts. The runs share one tokenizer, trained once into ``OUT/tokenizer.json``.

With ``[task] name = "mqar"`` the sweep writes ``documents`` MQAR training documents
(:func:`hyla.data.synthetic.write_mqar`: each of a length from ``lengths`` and a number of pairs from ``pairs``,
the loss on the answers only) to ``OUT/data/mqar.jsonl`` with a word-level tokenizer of ``3 x vocab`` ids, and
after each run asks its model ``hyla eval mqar`` over ``lengths`` x ``pairs`` (``OUT/runs/NAME/eval/mqar.json``)
and probes how it answers (``eval/probe.json``, :mod:`hyla.experiments.probe`); with ``name = "passkey"`` it
trains on passkey documents of ``lengths`` tokens and asks ``hyla eval passkey`` at ``scales`` x that length and
each of ``depths`` (:mod:`hyla.experiments.tasks`). Rows gain the accuracy; the evaluation runs on the device the
run trained on.

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
import operator
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hyla import eval as evaluation
from hyla.atomic import replace_file
from hyla.config import LIGHTNING, SOFTMAX, HylaConfig, preset
from hyla.data.corpus import discover
from hyla.data.shards import train_documents
from hyla.data.tokenizer import train_bpe
from hyla.errors import ConfigError
from hyla.experiments.probe import probe
from hyla.experiments.tasks import MQARTask, Task, read_task
from hyla.serve import LLM, EngineConfig
from hyla.train.config import TrainConfig, read_toml, train_fields
from hyla.train.loop import Precision, complete_report, train
from hyla.train.parallel import World, barrier, init_world, shutdown


def layer_types(pattern: str, depth: int) -> list[str]:
    """The ``depth`` layer types of ``pattern``: ``softmax``, ``lightning``, ``hybrid:N`` or a period of letters
    (``L`` lightning, ``S`` softmax, first layer first) repeated to ``depth``: ``SLLL`` at depth 8 is
    ``SLLLSLLL``, and ``hybrid:4`` is ``LLLS``."""
    if pattern == "softmax":
        return [SOFTMAX] * depth
    if pattern == "lightning":
        return [LIGHTNING] * depth
    if pattern and set(pattern) <= {"L", "S"}:
        if depth % len(pattern):
            raise ConfigError(f"pattern {pattern} repeats every {len(pattern)} layers: depth {depth} is not a multiple")
        return [SOFTMAX if c == "S" else LIGHTNING for c in pattern] * (depth // len(pattern))
    period = pattern.removeprefix("hybrid:")
    if not pattern.startswith("hybrid:") or not period.isdigit() or int(period) < 2:
        raise ConfigError(f"pattern must be softmax, lightning, hybrid:N (N >= 2) or letters L/S (a period such as "
                          f"SLLL), got {pattern!r}")  # fmt: skip
    if depth < int(period):
        raise ConfigError(f"pattern {pattern} puts a softmax layer every {period} layers: depth {depth} has none")
    return [SOFTMAX if (i + 1) % int(period) == 0 else LIGHTNING for i in range(depth)]


def model_fields(pattern: str, depth: int, width: int = 64) -> dict:
    """The model fields ``depth`` derives with ``width`` channels per layer (see the module docstring)."""
    if depth < 1:
        raise ConfigError(f"depth must be >= 1 (it gives the layers and the width), got {depth}")
    if width < 1 or width * depth % 32:
        raise ConfigError(f"width x depth must be a positive multiple of 32 (the head size), got {width} x {depth}")
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
    width: int
    steps: int
    name: str  # the run directory's name: hybrid8-d4-s100 (hybrid8-d4-w32-s100 when the grid has several widths)
    config: TrainConfig
    model: HylaConfig


def read_grid(path: str | Path, out: str | Path) -> tuple[list[Cell], Task | None]:
    """Every cell of the grid file ``path``, checked (the model builds, the run config validates; runs go under
    ``out``), and its ``[task]``. Raises :class:`ConfigError` naming the first problem."""
    where = f"grid file {str(path)!r}"
    spec = read_toml(path, "grid file")
    unknown = sorted(set(spec) - {"base", "model", "grid", "task"})
    grids = spec.get("grid", {})
    grids = [dict(g) for g in grids] if isinstance(grids, list) else [dict(grids)]
    for grid in grids:
        widths = grid.get("width", 64)
        grid["width"] = widths if isinstance(widths, list) else [widths]
        if unknown or sorted(grid) != ["depth", "pattern", "steps", "width"]:
            raise ConfigError(f"{where} needs [grid] (or several [[grid]]) with pattern, depth and steps (and "
                              f"optional [base], [model] and [task]); found sections {sorted(spec)} and grid keys "
                              f"{sorted(set(grid) - {'width'})}")  # fmt: skip
    several_widths = len({w for grid in grids for w in grid["width"]}) > 1
    base = train_fields(spec.get("base", {}), f"{where} [base]")
    task = read_task(spec.get("task"), where)
    for name in ("run_dir", "model", "steps", "tokenizer", *(("data", "vocab_size") if task else ())):
        if name in base:
            raise ConfigError(f"[base] may not set {name}: the sweep sets it for each run")
    out = Path(out)
    shared = {}
    if task:  # (the tokenizer file is written before the first run; a BPE tokenizer's size is checked here)
        shared = dict(data=str(out / "data" / f"{task.name}.jsonl"), tokenizer=str(out / "tokenizer.json"),
                      vocab_size=task.tokenizer().get_vocab_size())  # fmt: skip
        longest = task.longest_document
        if base.get("max_seq_len", TrainConfig.max_seq_len) < longest:
            raise ConfigError(f"{where}: [base] max_seq_len must hold the longest {task.name} document, {longest} "
                              "tokens")  # fmt: skip
    cells = []
    products = (itertools.product(g["pattern"], g["depth"], g["width"], g["steps"]) for g in grids)
    for pattern, depth, width, steps in itertools.chain.from_iterable(products):
        fields = {**spec.get("model", {}), **model_fields(pattern, depth, width)}
        name = f"{pattern.replace(':', '')}-d{depth}{f'-w{width}' if several_widths else ''}-s{steps}"
        if any(cell.name == name for cell in cells):
            raise ConfigError(f"{where} names the run {name} twice")
        try:
            config = TrainConfig(**{**base, **shared}, model=fields, steps=steps, run_dir=str(out / "runs" / name))
            model = preset("demo").replace(vocab_size=config.vocab_size, **fields)
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None
        if task and model.max_position_embeddings < task.longest_prompt:
            raise ConfigError(f"{where}: the {task.name} evaluation asks prompts of up to {task.longest_prompt} "
                              f"tokens; set [model] max_position_embeddings to at least that (the model has "
                              f"{model.max_position_embeddings})")  # fmt: skip
        cells.append(Cell(pattern, depth, width, steps, name, config, model))
    return cells, task


def sweep(grid: str | Path, out: str | Path, stop: threading.Event | None = None, log=print) -> list[dict]:
    """Run (or continue) the grid in ``grid`` under ``out``; returns the rows of ``out/sweep.json``. Stops after
    the current run's step when ``stop`` is set (run again to continue).

    Under ``torchrun`` every rank calls it and each run trains sharded across the ranks: rank 0 writes the shared
    files, logs and asks the recall task; a run stopped part-way starts again (sharded checkpoints keep no
    optimizer state to resume from)."""
    cells, task = read_grid(grid, out)
    world = init_world()
    try:
        return _sweep(cells, task, Path(out), stop or threading.Event(), log if world.main else _silent, world)
    finally:
        shutdown(world)


def _silent(line: str) -> None:
    """The log of ranks other than 0."""


def _sweep(cells: list[Cell], task: Task | None, out: Path, stop: threading.Event, log, world: World):
    tokenizer = out / "tokenizer.json"
    base = cells[0].config
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        if task and not Path(base.data).is_file():
            log(f"writing {task.documents:,} {task.name} documents to {base.data}")
            words = task.tokenizer()
            words.save(str(tokenizer))
            task.write(Path(base.data), words)
        elif not tokenizer.is_file():
            log(f"training the runs' {base.vocab_size}-id tokenizer into {tokenizer}")
            sources = discover(base.data)
            train_bpe(train_documents(sources, base.eval_fraction), base.vocab_size).save(str(tokenizer))
    barrier(world)
    rows = []
    for i, cell in enumerate(cells):
        run = Path(cell.config.run_dir)
        cell.config.tokenizer = str(tokenizer)
        report = complete_report(run)
        if report is None:
            resume = world.size == 1 and (run / "checkpoint" / "trainer.pt").is_file()
            log(f"[{i + 1}/{len(cells)}] {cell.name}: {'resuming' if resume else 'training'}")
            result = train(cell.config, resume=resume, overwrite=not resume and run.is_dir(), progress=False,
                            stop=stop)  # fmt: skip
            barrier(world)  # rank 0 wrote the report
            if result.interrupted:
                log(f"stopped in {cell.name}; run the same command again to continue")
                break
            report = complete_report(run)
        else:
            log(f"[{i + 1}/{len(cells)}] {cell.name}: done before, skipped")
        if report is None:
            raise ConfigError(f"{run} finished training without a held-out report: remove {run} to run it again")
        tokens = cell.config.steps * cell.config.tokens_per_batch * cell.config.grad_accum
        rows.append({"run": cell.name, "pattern": cell.pattern, "depth": cell.depth, "width": cell.width,
                     "steps": cell.steps, "parameters": cell.model.num_parameters(),
                     "active": cell.model.num_parameters(active=True), "n": scaling_parameters(cell.model),
                     "tokens": tokens, "flops": flops(cell.model, tokens, cell.config.max_seq_len),
                     "held_out_loss": report["held_out_loss"], "config": asdict(cell.config)})  # fmt: skip
        if task and world.main:
            device = Precision.resolve(cell.config).device  # where the run trained
            rows[-1][task.name] = _recall(run, task, log, device)
            if isinstance(task, MQARTask):
                rows[-1]["probe"] = _probe(run, task, log, device)
        barrier(world)
    if world.main:
        (out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def _recall(run: Path, task: Task, log, device: torch.device) -> dict:
    """The task's accuracy grid of ``run``'s model, measured once on ``device`` (``run/eval/NAME.json``) and read
    back after; ``mean`` (all cells' correct answers / trials) added."""
    path = run / "eval" / f"{task.name}.json"
    if not path.is_file():
        log(f"  asking {run.name} {task.describe()}")
        llm = LLM(run, config=EngineConfig(max_model_len=task.longest_prompt), device=device)
        result = task.evaluate(llm)
        evaluation.save(result, run / "eval", task.name,
                        f"{run.name}: {task.name} accuracy (chance {result.chance:.2g})")  # fmt: skip
    grid = json.loads(path.read_text())
    correct, trials = (sum(map(sum, grid[k])) for k in ("correct", "trials"))
    return {**grid, "mean": correct / trials}


def _probe(run: Path, task: MQARTask, log, device: torch.device) -> dict:
    """The mechanism probes (:mod:`hyla.experiments.probe`) of ``run``'s model at the task's middle length and
    pairs, measured once (``run/eval/probe.json``) and read back after."""
    path = run / "eval" / "probe.json"
    if not path.is_file():
        length, pairs = sorted(task.lengths)[len(task.lengths) // 2], sorted(task.pairs)[len(task.pairs) // 2]
        log(f"  probing {run.name} on MQAR contexts of {length} tokens with {pairs} pairs")
        result = probe(run, length, pairs, seed=task.seed + 2, device=device)
        replace_file(path, json.dumps(result.to_json(), indent=1) + "\n")
        (run / "eval" / "probe.md").write_text(f"{run.name}: mechanism probes\n\n{result.table()}\n")
    return json.loads(path.read_text())


# A fitted floor E below this (nats) sits at the parameterization's bound (E = exp(e), e -> -inf): runs far from
# convergence do not identify it, and the law's terms then extrapolate (measured: the scaling study's short runs).
FLOOR_AT_BOUND = 1e-3


def fit_families(rows: list[dict], bootstrap: int = 100) -> dict[str, dict]:
    """Per pattern with at least 5 runs, the law ``L(N, D)`` (:func:`hyla.experiments.scaling.fit`, ``N`` = ``n``,
    ``D`` = training tokens), its compute-optimal ``(N, D, L)`` at each decade of the sweep's FLOPs, and
    ``floor_identified``: False when the fitted ``E`` sits at its bound (:data:`FLOOR_AT_BOUND`)."""
    from hyla.experiments.scaling import fit

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
        fits[pattern] = {**law.to_json(), "runs": len(runs), "frontier": frontier,
                         "floor_identified": law.E > FLOOR_AT_BOUND}  # fmt: skip
    return fits


def plot(rows: list[dict], path: Path, fits: dict[str, dict] | None = None) -> Path:
    """The sweep's figure: a recall sweep's MQAR accuracy by pairs (one panel per length, one line per run), or
    its passkey accuracy by length x depth (a heat map per run); otherwise held-out loss against training FLOPs,
    one panel per pattern with a line per model size (its budgets) and, where ``fits`` has the pattern, the
    fitted law through them (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "mqar" in rows[0]:
        lengths, pairs = rows[0]["mqar"]["length"], rows[0]["mqar"]["pairs"]
        fig, axes = plt.subplots(1, len(lengths), figsize=(3.2 * len(lengths), 3.4), sharey=True, squeeze=False)
        for i, (ax, length) in enumerate(zip(axes[0], lengths, strict=True)):
            for r in rows:
                ax.plot(pairs, r["mqar"]["accuracy"][i], marker="o", label=r["run"])
            ax.axhline(rows[0]["mqar"]["chance"], color="grey", lw=0.8, ls=":")
            ax.set_xscale("log", base=2)
            ax.set_title(f"length {length:g}")
            ax.set_xlabel("key-value pairs")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("MQAR accuracy")
        axes[0][-1].legend(fontsize=7)
    elif "passkey" in rows[0]:
        fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows) + 0.8, 3.0), squeeze=False,
                                 layout="constrained")  # fmt: skip
        for ax, r in zip(axes[0], rows, strict=True):
            grid = r["passkey"]
            image = ax.imshow(np.array(grid["accuracy"], dtype=float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(grid["depth"])), [f"{d:g}" for d in grid["depth"]])
            ax.set_yticks(range(len(grid["length"])), [f"{n:g}" for n in grid["length"]])
            ax.set_title(r["run"], fontsize=8)
            ax.set_xlabel("needle depth")
        axes[0][0].set_ylabel("context length (tokens)")
        fig.colorbar(image, ax=axes[0].tolist(), label="passkey accuracy")
    else:
        from hyla.experiments.scaling import PARAMETERS, Fit

        patterns, size = list(dict.fromkeys(r["pattern"] for r in rows)), operator.itemgetter("depth", "width")
        fig, axes = plt.subplots(1, len(patterns), figsize=(4.2 * len(patterns), 3.8), sharey=True, squeeze=False)
        for ax, pattern in zip(axes[0], patterns, strict=True):
            law = Fit(**{p: fits[pattern][p] for p in PARAMETERS}) if fits and pattern in fits else None
            for (depth, width), group in itertools.groupby(sorted((r for r in rows if r["pattern"] == pattern),
                                                                  key=size), key=size):  # fmt: skip
                group = sorted(group, key=lambda r: r["flops"])
                line = ax.plot([r["flops"] for r in group], [r["held_out_loss"] for r in group], marker="o", ls="",
                               label=f"depth {depth}, width {width}: N = {group[0]['n'] / 1e6:.2f}M")  # fmt: skip
                if law is not None:
                    tokens = np.geomspace(group[0]["tokens"] / 1.5, group[-1]["tokens"] * 1.5, 30)
                    per_token = group[0]["flops"] / group[0]["tokens"]
                    ax.plot(tokens * per_token, law.loss(group[0]["n"], tokens), ls="--", color=line[0].get_color())
            ax.set_xscale("log")
            ax.set_title(pattern + (" (dashed: fitted law)" if law else ""))
            ax.set_xlabel("training FLOPs")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("held-out loss (nats/token)")
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(rows: list[dict]) -> str:
    """A markdown table of the runs; a recall sweep's has each run's accuracy on its task (all cells' answers)."""
    task = next((name for name in ("mqar", "passkey") if name in rows[0]), None)
    lines = ["| run | parameters (active) | tokens | FLOPs | held-out loss |" + (f" {task} accuracy |" if task else ""),
             "|---|---|---|---|---|" + ("---|" if task else "")]  # fmt: skip
    lines += [f"| {r['run']} | {r['parameters'] / 1e6:.2f}M ({r['active'] / 1e6:.2f}M) | {r['tokens']:,} | "
              f"{r['flops']:.3g} | {r['held_out_loss']:.4f} |" + (f" {r[task]['mean']:.3f} |" if task else "")
              for r in rows]  # fmt: skip
    return "\n".join(lines)
