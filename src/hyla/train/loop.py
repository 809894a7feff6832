"""The training loop: packed batches, AdamW, warmup + cosine, accumulation, clipping, checkpoints, resume.

A straight function, nanoGPT-style, in three ideas: :func:`plan_run` checks everything a run needs before
anything is written (a mistake costs a second, not a run), :func:`train` sets the run up and steps, and the
end of a run evaluates every held-out token and writes the report. A run directory holds the resolved
``train.json``, ``tokenizer.json``, ``metrics.jsonl`` (one JSON line per step and per evaluation) and
``checkpoint/`` (the model in hyla's transformers-compatible layout plus ``trainer.pt``: optimizer, step and
RNG state), replaced atomically. Resuming continues from the checkpoint's step with the same batches, so the
losses equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from hyla.atomic import atomic_directory, recover_directory, replace_file
from hyla.checkpoint import load, save_pretrained
from hyla.config import HylaConfig, preset
from hyla.data.corpus import Source, discover, segments
from hyla.data.packing import Batch, epoch_batches, packed_batches
from hyla.data.shards import TokenShard, build_shards, train_documents
from hyla.data.tokenizer import check_tokenizer_fits, load_tokenizer, train_bpe
from hyla.errors import ConfigError, DataError
from hyla.model import HylaForCausalLM
from hyla.model.decoder import next_token_targets
from hyla.ops.loss import IGNORE_INDEX
from hyla.train.config import TrainConfig, train_fields
from hyla.train.optim import build_optimizer, lr_at
from hyla.train.parallel import (
    World,
    all_reduce_sum,
    barrier,
    full_state_dict,
    init_world,
    parallelize,
    shutdown,
    to_float,
)
from hyla.train.report import report

# Writes a few continuations of a trained model: (model, tokenizer, seed) -> texts.
Sampler = Callable[[HylaForCausalLM, Tokenizer, int], list[str]]
# Steps timed before the run prints how long the rest should take.
ESTIMATE_AFTER = 5
# Fields that name files: compared resolved when a run is resumed, so that `runs/x`, `./runs/x/` or a moved run
# directory are the same run.
_PATHS = ("data", "tokenizer")
# Fields a resumed run may change: how long it trains, how often it evaluates and saves, where corpora are cached
# (none of them changes the numbers of the steps already taken). The rest is the run's identity.
RESUMABLE = ("steps", "eval_every", "eval_batches", "checkpoint_every", "cache_dir")


@dataclass
class TrainResult:
    """What :func:`train` did: the last step's metrics, whether it was stopped, and the end-of-run report (``None``
    fields: not reached). ``held_out_complete`` False: the final evaluation was stopped part-way (a resume
    finishes it)."""

    run_dir: str
    step: int = 0
    loss: float | None = None  # the last step's training loss
    eval_loss: float | None = None  # the last periodic evaluation (eval_batches batches)
    tokens: int = 0
    interrupted: bool = False
    already_finished: bool = False  # a resume of a finished run: nothing ran
    held_out_loss: float | None = None  # every held-out target (or those evaluated before a stop)
    held_out_tokens: int = 0
    held_out_complete: bool = False
    unigram_entropy: float | None = None
    ratio: float | None = None
    learned: bool = False
    samples: list[str] = field(default_factory=list)


@dataclass
class RunPlan:
    """What :func:`plan_run` found: everything checked, nothing written yet."""

    cfg: TrainConfig
    run: Path
    sources: list[Source]
    model_config: HylaConfig
    precision: Precision
    tokenizer: Tokenizer | None  # a resumed run's or a given tokenizer.json; None: one is trained on the data
    resume_state: dict | None  # a resumed run's trainer.pt (step, tokens, optimizer and RNG state)

    @property
    def resume_step(self) -> int:
        """The step a resumed run continues from; 0 for a new run."""
        return self.resume_state["step"] if self.resume_state else 0

    @property
    def finished(self) -> bool:
        """A resumed run that already did its steps and evaluated every held-out token (one stopped during that
        evaluation resumes it)."""
        return (
            self.resume_state is not None
            and self.resume_step >= self.cfg.steps
            and complete_report(self.run) is not None
        )


def complete_report(run: Path) -> dict | None:
    """``run/report.json`` if it holds the loss over every held-out token, else None (no report, a damaged one, or
    one whose evaluation was stopped)."""
    try:
        report = json.loads((run / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) and report.get("held_out_complete") else None


def _comparable(fields: dict) -> dict:
    """A run's fields as they decide its numbers: paths resolved; the run directory and :data:`RESUMABLE` left out
    (a run may move, be extended, evaluate more often or find its corpus cache elsewhere)."""
    out = {k: v for k, v in fields.items() if k not in ("run_dir", *RESUMABLE)}
    for key in _PATHS:
        if out.get(key) is not None:
            out[key] = str(Path(out[key]).expanduser().resolve())
    return out


def _read_train_json(run: Path) -> dict:
    try:
        fields = json.loads((run / "train.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot resume {run}: its train.json is missing or damaged ({e})") from None
    if not isinstance(fields, dict):
        raise DataError(f"cannot resume {run}: its train.json holds no JSON object")
    return fields


def resume_config(run_dir: str | Path, changes: dict | None = None) -> TrainConfig:
    """The config of the run in ``run_dir`` as its ``train.json`` holds it, with ``changes`` (the flags given with
    ``--resume``) applied to the fields a resumed run may change (:data:`RESUMABLE`); a change to any other field
    raises :class:`DataError` naming it (a value equal to the run's, paths compared resolved, is no change)."""
    run = Path(run_dir)
    recover_directory(run / "checkpoint")
    if not (run / "checkpoint" / "trainer.pt").is_file():
        raise DataError(f"nothing to resume in {run}: no checkpoint/trainer.pt (start it without --resume)")
    previous = {**train_fields(_read_train_json(run), f"{run / 'train.json'}"), "run_dir": str(run)}
    changes = {k: v for k, v in (changes or {}).items() if k != "run_dir"}
    kept, given = _comparable(previous), _comparable(changes)
    differ = sorted(k for k, v in given.items() if kept.get(k) != v)
    if differ:
        raise DataError(f"{run} was trained with other values of {differ}: a resumed run keeps its config except "
                        f"{', '.join(RESUMABLE)}; train another config with a new --run-dir")  # fmt: skip
    return TrainConfig(**{**previous, **{k: v for k, v in changes.items() if k in RESUMABLE}})


def check_sources(sources: list[Source]) -> None:
    """Read every ``.jsonl`` line of ``sources`` once, so that a malformed one fails before a run writes anything."""
    for source in sources:
        if source.kind == "jsonl":
            for _ in segments(source):
                pass


def plan_run(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, world: World | None = None) -> RunPlan:
    """Check a run before anything is written: the data, the tokenizer file, the model's config (preset and
    overrides), device and dtype, and what the run directory holds. Raises :class:`ConfigError` or
    :class:`DataError` naming the problem and the fix."""
    world = world or World()
    run = Path(cfg.run_dir)
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: give one of them")
    if world.size > 1 and cfg.grad_accum % world.size:
        raise ConfigError(f"grad_accum ({cfg.grad_accum}) must be a multiple of the {world.size} processes")
    if world.size > 1 and resume:
        raise ConfigError("--resume runs on one process; start it without torchrun")
    precision = Precision.resolve(cfg)
    sources = discover(cfg.data)
    check_sources(sources)
    recover_directory(run / "checkpoint")
    tokenizer = None
    if resume and (run / "checkpoint" / "trainer.pt").is_file():  # (without one: "nothing to resume", below)
        tokenizer = load_tokenizer(run / "tokenizer.json")
    elif cfg.tokenizer is not None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    vocab_size = cfg.vocab_size if tokenizer is None else tokenizer.get_vocab_size()
    model_config = preset(cfg.preset, **{"vocab_size": vocab_size, **cfg.model})
    check_tokenizer_fits(vocab_size, model_config.vocab_size)
    holds_a_run = run.is_dir() and any(run.iterdir())
    if run.exists() and not run.is_dir():
        raise DataError(f"--run-dir {run} is a file, not a directory")
    resume_state = None
    if resume:
        if not (run / "checkpoint" / "trainer.pt").is_file():
            raise DataError(f"nothing to resume in {run}: no checkpoint/trainer.pt (start it without --resume)")
        previous = _read_train_json(run)
        changed = sorted(k for k, v in _comparable(cfg.to_json()).items() if _comparable(previous).get(k) != v)
        if changed:
            raise DataError(f"{run} was trained with another config (differs in {changed}); use a new --run-dir")
        resume_state = _load_trainer_state(run / "checkpoint" / "trainer.pt")
        if resume_state["optimizer"] is None:
            raise DataError(f"{run} was trained sharded (torchrun), which keeps no optimizer state to resume from")
        if resume_state["step"] > cfg.steps:
            raise ConfigError(f"steps ({cfg.steps}) is below the step of {run}'s checkpoint ({resume_state['step']})")
    elif holds_a_run and not overwrite and world.main:
        raise DataError(f"{run} already holds a run: continue it with --resume, replace it with --overwrite, "
                        "or choose another --run-dir")  # fmt: skip
    elif holds_a_run and not (run / "train.json").is_file():
        raise DataError(f"--overwrite replaces a hyla run, but {run} holds other files (no train.json): "
                        "choose another --run-dir")  # fmt: skip
    return RunPlan(cfg, run, sources, model_config, precision, tokenizer, resume_state)


def _load_trainer_state(path: Path) -> dict:
    """A checkpoint's ``trainer.pt``, read with ``weights_only=True``: tensors and plain values only, never a
    pickled object (a run directory is data; a planted pickle must not run code)."""
    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # a hostile pickle, a damaged archive, a cut file
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"
        raise DataError(f"cannot resume from {path}: it is not a trainer state hyla wrote ({type(e).__name__}: "
                        f"{first})") from None  # fmt: skip
    if not isinstance(state, dict) or not {"step", "tokens", "optimizer", "rng"} <= set(state):
        raise DataError(f"cannot resume from {path}: it lacks the step, tokens, optimizer or rng state")
    return state


def _write_json(path: Path, value: dict) -> None:
    """Replace ``path`` with ``value`` as JSON, atomically."""
    replace_file(path, json.dumps(value, indent=2) + "\n")


@contextlib.contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the run directory while a process writes it: a second ``hyla train`` of the
    same directory is refused with :class:`DataError` instead of interleaving its steps. The kernel drops the
    lock when the process ends, however it ends; no file is left behind."""
    import fcntl

    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{run} is being trained by another process; wait for it to end, or stop it") from None
        yield
    finally:
        os.close(fd)  # (closing drops the lock)


def _start_run_dir(plan: RunPlan, overwrite: bool) -> Tokenizer:
    """Write the run's ``train.json`` and ``tokenizer.json`` (training a BPE on the data's training split unless
    one is given or the run is resumed: then ``train.json`` takes the resumed config's steps and cadence); with
    ``overwrite``, the old run's files go first."""
    run, cfg = plan.run, plan.cfg
    if plan.resume_state is not None:
        _write_json(run / "train.json", cfg.to_json())
        return plan.tokenizer
    if overwrite and run.is_dir():  # emptied, not removed: this process holds the directory's lock
        for item in run.iterdir():
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    run.mkdir(parents=True, exist_ok=True)
    _write_json(run / "train.json", cfg.to_json())
    tokenizer = plan.tokenizer
    if tokenizer is None:
        began = time.perf_counter()
        print(f"training a {cfg.vocab_size}-id byte-level BPE tokenizer on {len(plan.sources):,} files "
              "(the training split) ...", flush=True)  # fmt: skip
        documents = train_documents(plan.sources, cfg.eval_fraction)
        tokenizer = train_bpe(documents, cfg.vocab_size, progress=sys.stderr.isatty())
        print(f"tokenizer trained in {time.perf_counter() - began:.0f} s", flush=True)
    tokenizer.save(str(run / "tokenizer.json"))
    return tokenizer


def _describe(plan: RunPlan) -> str:
    """The one-line plan printed at the start."""
    cfg, c = plan.cfg, plan.model_config
    data = cfg.data or "the Python standard library"
    size = f"{c.num_parameters() / 1e6:.1f}M parameters ({c.num_parameters(active=True) / 1e6:.1f}M active)"
    tokens = cfg.steps * cfg.tokens_per_batch * cfg.grad_accum
    start = f"resuming at step {plan.resume_step}" if plan.resume_step else "a new run"
    if plan.resume_step >= cfg.steps:
        start = f"finishing the held-out evaluation of step {plan.resume_step}"
    where = f"{plan.precision.device.type}, {'bfloat16 autocast' if plan.precision.bf16 else 'float32'}"
    return (f"hyla train: {start} in {plan.run}: preset {cfg.preset!r}, {size}; {cfg.steps} steps x "
            f"{cfg.tokens_per_batch * cfg.grad_accum:,} tokens = {_count(tokens)} tokens of {data} "
            f"({len(plan.sources):,} files); {where}")  # fmt: skip


def _count(n: int) -> str:
    """``n`` in words a reader takes in at once: 40,960, 3.5M or 1.2B."""
    return f"{n:,}" if n < 10**6 else f"{n / 1e6:.1f}M" if n < 10**9 else f"{n / 1e9:.1f}B"


def evaluate(model: HylaForCausalLM, shard: TokenShard, cfg: TrainConfig, precision: Precision) -> float:
    """Mean next-token loss over ``eval_batches`` fixed batches of the held-out shard."""
    batches = packed_batches(shard, cfg.tokens_per_batch, cfg.max_seq_len, seed=cfg.seed)
    losses = [_batch_loss(model, next(batches), precision) for _ in range(cfg.eval_batches)]
    return sum(losses) / len(losses)


def evaluate_all(
    model: HylaForCausalLM,
    shard: TokenShard,
    cfg: TrainConfig,
    precision: Precision,
    stop: threading.Event | None = None,
) -> tuple[float, int, bool]:
    """Mean next-token loss over every token of ``shard`` (each batch weighted by the targets it holds).

    Returns ``(loss, targets, complete)``: ``complete`` is False when ``stop`` was set before the end (the
    loss is then that of the ``targets`` evaluated)."""
    total = count = 0.0
    for batch in epoch_batches(shard, cfg.tokens_per_batch, cfg.max_seq_len):
        if stop is not None and stop.is_set():
            return total / max(count, 1), int(count), False
        targets = int((next_token_targets(batch.labels, batch.cu_seqlens) != IGNORE_INDEX).sum())
        if targets:
            total += _batch_loss(model, batch, precision) * targets
            count += targets
    return total / max(count, 1), int(count), True


@torch.no_grad()
def _batch_loss(model: HylaForCausalLM, batch: Batch, precision: Precision) -> float:
    """One packed batch's mean next-token loss over its targets, in eval mode."""
    model.eval()
    tokens, cu_seqlens, labels = precision.move(batch)
    with precision.autocast():
        loss = model.loss(tokens, labels, cu_seqlens).loss.item()
    model.train()
    return loss


@dataclass
class Precision:
    """Where the step runs and whether under bfloat16 autocast (weights, optimizer and loss stay float32)."""

    device: torch.device
    bf16: bool

    @classmethod
    def resolve(cls, cfg: TrainConfig) -> Precision:
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cuda and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' asked for, but no CUDA device is available")
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and cuda and torch.cuda.is_bf16_supported())
        return cls(device, bf16)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def move(self, batch: Batch) -> Batch:
        return Batch(*(t.to(self.device) for t in batch))


def _save_checkpoint(run: Path, model: HylaForCausalLM, optimizer, step: int, tokens_seen: int, world: World) -> None:
    """Replace ``run/checkpoint`` atomically. Sharded runs gather the full weights (every rank takes part) and
    rank 0 writes them; their optimizer state stays out of the checkpoint (resume is single-process)."""
    weights = full_state_dict(model, world)
    if not world.main:
        return
    if world.size > 1:
        with torch.device("meta"):
            model = HylaForCausalLM(model.config)
        model.load_state_dict(weights, assign=True)
        model.reset_buffers()
    with atomic_directory(run / "checkpoint") as tmp:
        save_pretrained(model, tmp / "model")
        shutil.copy2(run / "tokenizer.json", tmp / "model" / "tokenizer.json")
        optimizer_state = optimizer.state_dict() if world.size == 1 else None
        state = {"step": step, "tokens": tokens_seen, "optimizer": optimizer_state, "rng": torch.get_rng_state()}
        torch.save(state, tmp / "trainer.pt")


def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    stop: threading.Event | None = None,
    sampler: Sampler | None = None,
) -> TrainResult:
    """Train (or resume) a run; returns a :class:`TrainResult`: ``interrupted`` when ``stop`` was set (a
    checkpoint of the last step is saved), ``already_finished`` for ``resume`` of a run that had done its steps
    and its evaluation (nothing runs).
    ``sampler(model, tokenizer, seed)`` writes the report's samples (the CLI hands it the serving engine's).

    Under ``torchrun`` the model is sharded with FSDP2 and each of the ``N`` ranks takes every ``N``-th of a
    step's ``grad_accum`` micro-batches, so that the steps equal a single process's with the same global batch.
    """
    world = init_world()
    try:
        plan = plan_run(cfg, resume, overwrite, world)
        if plan.finished:
            return TrainResult(str(plan.run), step=plan.resume_step, already_finished=True)
        with run_lock(plan.run) if world.main else contextlib.nullcontext():
            return _train(plan, overwrite, progress and world.main, world, stop or threading.Event(), sampler)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise DataError(f"no space left on the device writing {e.filename or cfg.run_dir}: the last complete "
                        f"checkpoint is kept; free some space, then: hyla train --run-dir {cfg.run_dir} "
                        "--resume") from None  # fmt: skip
    finally:
        shutdown(world)


def _train(
    plan: RunPlan, overwrite: bool, progress: bool, world: World, stop: threading.Event, sampler: Sampler | None
) -> TrainResult:
    cfg, run, precision = plan.cfg, plan.run, plan.precision
    if progress:
        print(_describe(plan), flush=True)
    # Rank 0 writes the run directory and fills the shard cache; the others then read both.
    if world.main:
        tokenizer = _start_run_dir(plan, overwrite)
        shards = build_shards(plan.sources, tokenizer, cfg.cache_dir, cfg.eval_fraction, progress)
    barrier(world)
    if not world.main:
        tokenizer = load_tokenizer(run / "tokenizer.json")
        shards = build_shards(plan.sources, tokenizer, cfg.cache_dir, cfg.eval_fraction, progress=False)

    torch.manual_seed(cfg.seed)
    model = HylaForCausalLM(plan.model_config)
    model.reset_parameters(seed=cfg.seed)
    model.to(precision.device)
    if world.mesh is not None:
        parallelize(model, world.mesh)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    batches = packed_batches(shards["train"], cfg.tokens_per_batch, cfg.max_seq_len, seed=cfg.seed)
    start = tokens_seen = 0
    if plan.resume_state is not None:
        state = plan.resume_state
        model.load_state_dict(load(run / "checkpoint" / "model").state_dict())
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, tokens_seen = state["step"], state["tokens"]
        for _ in range(start * cfg.grad_accum):  # the same batches as an uninterrupted run
            next(batches)

    held_out = shards["eval"] if len(shards["eval"]) else shards["train"]
    result = TrainResult(str(run), step=start, tokens=tokens_seen)
    metrics: dict = {}
    model.train()
    # A new run starts its metrics afresh, a resumed one drops the lines of steps it redoes; only rank 0 writes.
    log_path = run / "metrics.jsonl" if world.main else Path(os.devnull)
    if world.main and plan.resume_step:
        _truncate_metrics(log_path, start)
    began = time.perf_counter()
    with log_path.open("a" if plan.resume_step else "w") as log, tqdm(
        total=cfg.steps, initial=start, disable=not progress, unit="step"
    ) as bar:  # fmt: skip
        for step in range(start, cfg.steps):
            metrics = _step(model, optimizer, batches, step, cfg, precision, world)
            tokens_seen += metrics.pop("step_tokens")
            metrics["tokens"] = tokens_seen
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                metrics["eval_loss"] = evaluate(model, held_out, cfg, precision)
                if progress:
                    bar.write(f"step {step + 1}: held-out loss {metrics['eval_loss']:.3f} (training loss "
                              f"{metrics['loss']:.3f})")  # fmt: skip
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update()
            if progress and step == start + ESTIMATE_AFTER - 1 < cfg.steps - 1:
                per_step, left = (time.perf_counter() - began) / ESTIMATE_AFTER, cfg.steps - step - 1
                bar.write(f"expected: ~{per_step * left / 60:.1f} more minutes for {left} steps "
                          f"({per_step:.2f} s a step so far), then the evaluation")  # fmt: skip
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or stop.is_set():
                _save_checkpoint(run, model, optimizer, step + 1, tokens_seen, world)
            result.step, result.loss, result.tokens = metrics["step"], metrics["loss"], tokens_seen
            result.eval_loss = metrics.get("eval_loss", result.eval_loss)
            if stop.is_set():
                result.interrupted = True
                return result
    _finish(result, model, held_out, shards["train"], tokenizer, plan, world, stop, sampler)
    return result


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to ``step``: a run killed after its last checkpoint redoes the steps
    past it, which must not appear twice."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if _line_step(line) <= step]
    replace_file(path, "".join(kept))


def _line_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")  # a torn last line of a killed process


def _step(model, optimizer, batches, step: int, cfg: TrainConfig, precision: Precision, world: World) -> dict:
    """One optimizer step over ``grad_accum`` micro-batches; the step's metrics (``step_tokens``: its tokens)."""
    began = time.perf_counter()
    lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum, tokens = 0.0, 0
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        if micro % world.size != world.rank:
            continue
        ids, cu_seqlens, labels = precision.move(batch)
        with precision.autocast():
            out = model.loss(ids, labels, cu_seqlens)
        # x N: FSDP averages the N ranks' gradients, and each rank saw 1/N of the micro-batches.
        scale = world.size / cfg.grad_accum
        ((out.loss + model.config.router_aux_loss_coef * out.aux_loss) * scale).backward()
        loss_sum += out.loss.item() / cfg.grad_accum
        tokens += ids.shape[1]
    loss_sum, tokens = all_reduce_sum([loss_sum, tokens], world)
    grad_norm = to_float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "step_tokens": int(tokens),
            "tokens_per_s": tokens / (time.perf_counter() - began)}  # fmt: skip


def _finish(result: TrainResult, model, held_out: TokenShard, train_shard: TokenShard, tokenizer: Tokenizer,
            plan: RunPlan, world: World, stop: threading.Event, sampler: Sampler | None) -> None:  # fmt: skip
    """The end of a run, into ``result``: every held-out token evaluated (every rank: the model may be sharded),
    then, on rank 0, ``report.json`` with the loss against the unigram entropy, the plot and samples. Stopped
    during the evaluation, the report still holds what finished: the training, and the loss over the tokens
    evaluated (a resume evaluates again)."""
    loss, targets, complete = evaluate_all(model, held_out, plan.cfg, plan.precision, stop)
    if not world.main:
        return
    summary = report(plan.run, train_shard, loss, tokenizer.get_vocab_size())
    summary.update(
        held_out_tokens=targets, held_out_complete=complete, model_dir=str(plan.run / "checkpoint" / "model")
    )
    if not complete:
        summary["interrupted"] = True
    elif sampler is not None:
        summary["samples"] = sampler(load(plan.run / "checkpoint" / "model"), tokenizer, plan.cfg.seed)
    (plan.run / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    result.held_out_loss, result.held_out_tokens, result.held_out_complete = loss, targets, complete
    result.unigram_entropy, result.ratio, result.learned = summary["unigram_entropy"], summary["ratio"], summary[
        "learned"]  # fmt: skip
    result.samples, result.interrupted = summary.get("samples", []), not complete
