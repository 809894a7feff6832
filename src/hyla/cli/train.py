"""``hyla train``: the main job, or any run; Ctrl-C saves and says how to resume."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from hyla.cli.common import add_config_flags, is_main_rank, stop_on_signals

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from hyla.model import HylaForCausalLM
    from hyla.train.config import TrainConfig
    from hyla.train.loop import TrainResult

# The prompts of the samples at the end of `hyla train` (the default corpus is Python code).
SAMPLE_PROMPTS = ("class Parser:\n    def ", "    for i in range(", "def test_")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    from hyla.train.config import TrainConfig

    tr = commands.add_parser("train", help="train a model (default: the 2.3M demo on the Python standard library)",
                             description="Train a model. With no flags: the main job, a 2.3M-parameter code model "
                             "on this Python's standard library (10-12 minutes on 2 CPU cores), into runs/default. "
                             "A run directory is never replaced by accident: continue it with --resume (its own "
                             "config; flags given may change only steps, evaluation and checkpoint cadence and "
                             "the cache directory) or replace it with --overwrite.")  # fmt: skip
    # Defaults None: not given, so that a --config file's value (or the dataclass default) applies.
    add_config_flags(tr, TrainConfig, given_only=True)
    tr.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="change a field of the model preset, e.g. --set hidden_size=256 (repeatable)")  # fmt: skip
    tr.add_argument("--config", default=None, metavar="FILE.toml",
                    help="the run's fields from a TOML file ([model]: preset changes); flags override it")  # fmt: skip
    tr.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="replace the run in --run-dir, deleting its files")
    tr.set_defaults(run=run_train)


def samples(model: HylaForCausalLM, tokenizer: Tokenizer, seed: int) -> list[str]:
    """A continuation of each of :data:`SAMPLE_PROMPTS` (temperature 0.6, top-p 0.95, seeded)."""
    from hyla.serve import LLM, EngineConfig, SamplingParams

    llm = LLM(model.eval(), tokenizer, EngineConfig(max_num_seqs=len(SAMPLE_PROMPTS), max_model_len=512))
    params = SamplingParams(max_tokens=80, temperature=0.6, top_p=0.95, seed=seed)
    return [p + c[0].text for p, c in zip(SAMPLE_PROMPTS, llm.generate(list(SAMPLE_PROMPTS), params), strict=True)]


def train_config(args: argparse.Namespace) -> TrainConfig:
    """A TOML file's fields, then the flags given, then preset overrides from ``--set``; with ``--resume``, the
    run's own config (its ``train.json``) with what of those a resumed run may change."""
    import dataclasses

    from hyla.errors import ConfigError
    from hyla.train.config import TrainConfig, load_train_toml
    from hyla.train.loop import resume_config

    fields = load_train_toml(args.config) if args.config else {}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    fields.update({k: v for k, v in given.items() if v is not None})
    overrides = fields.pop("model", {})
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes FIELD=VALUE, got {item!r}")
        overrides[name] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    if args.resume:
        run_dir = fields.pop("run_dir", TrainConfig.run_dir)
        return resume_config(run_dir, {**fields, "model": overrides} if overrides else fields)
    return TrainConfig(**fields, model=overrides)


def run_train(args: argparse.Namespace) -> int:
    """``hyla train``: Ctrl-C or SIGTERM stops at the end of the step, saves a checkpoint and says how to resume."""
    from hyla.train.loop import train

    cfg = train_config(args)
    with stop_on_signals("stopping after this step") as stop:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite, stop=stop, sampler=samples)
    if is_main_rank():
        print(summary(cfg, result))
    return 130 if result.interrupted else 0


def summary(cfg: TrainConfig, r: TrainResult) -> str:
    """What a run did, where its model is, and the commands that come next."""
    run = shlex.quote(str(cfg.run_dir))
    if r.already_finished:
        return (f"{run} already finished its {r.step} steps: nothing to do. To train it further, raise --steps "
                f"(hyla train --run-dir {run} --resume --steps {2 * r.step}), or start a new run with another "
                "--run-dir.")  # fmt: skip
    lines = [f"--- sample ---\n{text}" for text in r.samples]
    if r.interrupted and r.held_out_loss is None:
        lines.append(f"interrupted at step {r.step}; checkpoint saved; resume with: "
                     f"hyla train --run-dir {run} --resume")  # fmt: skip
        return "\n".join(lines)
    if r.held_out_loss is not None:
        verdict = "learned" if r.learned else "not yet learned: the bar is 0.6"
        scope = (f"all {r.held_out_tokens:,} held-out tokens" if r.held_out_complete else
                 f"the first {r.held_out_tokens:,} held-out tokens (evaluation interrupted; resume with: hyla "
                 f"train --run-dir {run} --resume)")  # fmt: skip
        lines.append(f"held-out loss {r.held_out_loss:.3f} nats/token over {scope} = {r.ratio:.3f} x the "
                     f"unigram entropy ({r.unigram_entropy:.3f}) — {verdict}")  # fmt: skip
    where = Path(cfg.run_dir)
    lines += [
        f"model: {where / 'checkpoint' / 'model'}  (report: {where / 'report.json'}, curve: {where / 'loss.png'}, "
        f"every step: {where / 'metrics.jsonl'})",
        "next:",
        f'  hyla generate {run} --prompt "def fibonacci(n):"',
        f"  hyla chat {run}",
        f"  hyla serve {run}",
    ]
    return "\n".join(lines)
