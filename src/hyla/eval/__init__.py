"""Evaluation: what a model recalls from its context (:mod:`~hyla.eval.recall`: MQAR, passkey, through the
serving engine) and how its loss falls with position (:mod:`~hyla.eval.position`). Each result is a table, a
JSON file and a PNG (:func:`save`)."""

from __future__ import annotations

import json
from pathlib import Path

from hyla.eval.position import PositionLoss, document_ids, loss_by_position
from hyla.eval.recall import Grid, mqar, passkey

__all__ = ["Grid", "PositionLoss", "document_ids", "loss_by_position", "mqar", "passkey", "save"]


def save(result: Grid | PositionLoss, folder: str | Path, name: str, title: str) -> tuple[Path, Path]:
    """Write ``folder/name.json`` and ``folder/name.png`` (a heat map of a grid, a curve of loss by position)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if isinstance(result, Grid):
        acc = [[result.accuracy(i, j) for j in range(len(result.columns))] for i in range(len(result.rows))]
        image = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for i, row in enumerate(acc):
            for j, a in enumerate(row):
                if result.trials[i][j]:
                    ax.text(j, i, f"{a:.2f}", ha="center", va="center", color="white" if a < 0.6 else "black")
        ax.set_xticks(range(len(result.columns)), [f"{c:g}" for c in result.columns])
        ax.set_yticks(range(len(result.rows)), [f"{r:g}" for r in result.rows])
        ax.set_xlabel(result.column_name)
        ax.set_ylabel(f"{result.row_name} (tokens)")
        fig.colorbar(image, label="accuracy")
    else:
        buckets = result.buckets()
        ax.plot([(a + b) / 2 for a, b, _, _ in buckets], [loss for _, _, loss, _ in buckets], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("token position (log2 buckets)")
        ax.set_ylabel("mean next-token loss (nats)")
        ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(folder / f"{name}.png", dpi=110)
    plt.close(fig)
    return folder / f"{name}.json", folder / f"{name}.png"
