"""The end of a run: did it learn? Held-out loss against the corpus's unigram entropy, and a loss plot."""

from __future__ import annotations

import json
from pathlib import Path

from hyla.data.shards import TokenShard, unigram_entropy

# The main job's bar: a model that learned context, not just token frequencies.
LEARNED_RATIO = 0.6


def plot_losses(run: Path) -> Path:
    """``run/loss.png``: train loss (every step) and held-out loss (each evaluation) against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([m["tokens"] for m in lines], [m["loss"] for m in lines], lw=1, alpha=0.7, label="train")
    evals = [m for m in lines if "eval_loss" in m]
    ax.plot([m["tokens"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="held-out")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(run: Path, train: TokenShard, held_out_loss: float, vocab_size: int) -> dict:
    """The learning summary: held-out loss (every held-out token), the training tokens' unigram entropy, ratio."""
    entropy = unigram_entropy(train, vocab_size)
    ratio = held_out_loss / entropy
    learned = ratio <= LEARNED_RATIO
    return {"held_out_loss": held_out_loss, "unigram_entropy": entropy, "ratio": ratio, "learned": learned,
            "plot": str(plot_losses(run))}  # fmt: skip
