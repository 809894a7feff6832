"""The training loop: packed batches, AdamW, warmup + cosine, accumulation, clipping, checkpoints, resume.

A straight function, nanoGPT-style. A run directory holds the resolved ``train.json``, ``tokenizer.json``,
``metrics.jsonl`` (one JSON line per step and per evaluation) and ``checkpoint/`` (the model in hyla's
transformers-compatible layout plus ``trainer.pt``: optimizer, step and RNG state), replaced atomically.
Resuming continues from the checkpoint's step with the same batches, so the losses equal an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from hyla.checkpoint import load, save_pretrained
from hyla.config import ConfigError, preset
from hyla.data.corpus import discover
from hyla.data.packing import epoch_batches, packed_batches
from hyla.data.shards import TokenShard, build_shards, train_documents
from hyla.data.tokenizer import train_bpe
from hyla.errors import DataError
from hyla.model import HylaForCausalLM
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
from hyla.train.report import report, samples


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    preset: str = "demo"  # the defaults are the main job: `hyla train` with no flags
    model: dict = field(default_factory=dict)  # overrides of the preset's fields
    data: str | None = None  # None: the Python standard library
    tokenizer: str | None = None  # a tokenizer.json; None: train a byte-level BPE of vocab_size
    vocab_size: int = 384
    steps: int = 440
    tokens_per_batch: int = 8192
    max_seq_len: int = 512
    grad_accum: int = 1
    lr: float = 5e-3
    warmup: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    eval_every: int = 70
    eval_batches: int = 4
    checkpoint_every: int = 100
    eval_fraction: float = 0.01
    seed: int = 0
    device: str = "auto"  # "auto": this rank's GPU if there is one, else the CPU
    dtype: str = "auto"  # "auto": bfloat16 autocast on a GPU that has it, float32 on the CPU (where it is faster)
    cache_dir: str = str(Path.home() / ".cache" / "hyla")

    def __post_init__(self) -> None:
        checks = [
            ("steps", self.steps >= 1, ">= 1"),
            ("max_seq_len", self.max_seq_len >= 2, ">= 2 (a token and its successor)"),
            ("tokens_per_batch", self.tokens_per_batch >= self.max_seq_len, f">= max_seq_len ({self.max_seq_len})"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("warmup", self.warmup >= 0, ">= 0"),
            ("clip", self.clip > 0, "> 0"),
            ("eval_every", self.eval_every >= 1, ">= 1"),
            ("eval_batches", self.eval_batches >= 1, ">= 1"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("eval_fraction", 0 <= self.eval_fraction < 1, "in [0, 1)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def load_train_toml(path: str | Path) -> dict:
    """The fields of a :class:`TrainConfig` from a TOML file (``[model]``: preset overrides), checked by name."""
    try:
        fields = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise DataError(f"config file {str(path)!r}: unknown fields {unknown}; known: {sorted(known)}")
    if "betas" in fields:
        fields["betas"] = tuple(fields["betas"])
    return fields


def _tokenizer(cfg: TrainConfig, run: Path, sources) -> Tokenizer:
    if (run / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(run / "tokenizer.json"))
    if cfg.tokenizer is not None:
        if not Path(cfg.tokenizer).is_file():
            raise DataError(f"tokenizer {cfg.tokenizer!r} does not exist")
        tokenizer = Tokenizer.from_file(cfg.tokenizer)
    else:
        tokenizer = train_bpe(train_documents(sources, cfg.eval_fraction), cfg.vocab_size)
    tokenizer.save(str(run / "tokenizer.json"))
    return tokenizer


def evaluate(model: HylaForCausalLM, shard: TokenShard, cfg: TrainConfig, precision: Precision) -> float:
    """Mean next-token loss over ``eval_batches`` fixed batches of the held-out shard."""
    batches = packed_batches(shard, cfg.tokens_per_batch, cfg.max_seq_len, seed=cfg.seed)
    losses = [_batch_loss(model, *next(batches), precision) for _ in range(cfg.eval_batches)]
    return sum(losses) / len(losses)


def evaluate_all(model: HylaForCausalLM, shard: TokenShard, cfg: TrainConfig, precision: Precision) -> float:
    """Mean next-token loss over every token of ``shard`` (each batch weighted by the targets it holds)."""
    total = count = 0.0
    for tokens, cu_seqlens in epoch_batches(shard, cfg.tokens_per_batch, cfg.max_seq_len):
        targets = tokens.shape[1] - (len(cu_seqlens) - 1)  # every piece's last token predicts nothing
        if targets:
            total += _batch_loss(model, tokens, cu_seqlens, precision) * targets
            count += targets
    return total / max(count, 1)


@torch.no_grad()
def _batch_loss(model: HylaForCausalLM, tokens: torch.Tensor, cu_seqlens: torch.Tensor, precision: Precision) -> float:
    """One packed batch's mean next-token loss, in eval mode."""
    model.eval()
    tokens, cu_seqlens = precision.move(tokens, cu_seqlens)
    with precision.autocast():
        loss = model(tokens, labels=tokens, cu_seqlens=cu_seqlens, return_logits=False).loss.item()
    model.train()
    return loss


@dataclass
class Precision:
    """Where the step runs and whether under bfloat16 autocast (weights, optimizer and loss stay float32)."""

    device: torch.device
    bf16: bool

    @classmethod
    def resolve(cls, cfg: TrainConfig) -> Precision:
        if cfg.device not in ("auto", "cpu", "cuda") or cfg.dtype not in ("auto", "float32", "bfloat16"):
            raise DataError(f"device must be auto/cpu/cuda and dtype auto/float32/bfloat16, got {cfg.device!r}, "
                              f"{cfg.dtype!r}")  # fmt: skip
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cuda and not torch.cuda.is_available():
            raise DataError("device 'cuda' asked for, but no CUDA device is available")
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and cuda and torch.cuda.is_bf16_supported())
        return cls(device, bf16)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def move(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens.to(self.device), cu_seqlens.to(self.device)


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
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=run))
    try:
        save_pretrained(model, tmp / "model")
        shutil.copy2(run / "tokenizer.json", tmp / "model" / "tokenizer.json")
        optimizer_state = optimizer.state_dict() if world.size == 1 else None
        state = {"step": step, "tokens": tokens_seen, "optimizer": optimizer_state, "rng": torch.get_rng_state()}
        torch.save(state, tmp / "trainer.pt")
        old = run / "checkpoint"
        if old.exists():
            os.replace(old, run / ".checkpoint.old")
        os.replace(tmp, old)
        shutil.rmtree(run / ".checkpoint.old", ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) a run; returns the last metrics: ``{"step", "loss", "eval_loss", ...}``.

    Under ``torchrun`` the model is sharded with FSDP2 and each of the ``N`` ranks takes every ``N``-th of a
    step's ``grad_accum`` micro-batches, so that the steps equal a single process's with the same global batch.
    """
    world = init_world()
    try:
        return _train(cfg, resume, progress and world.main, world)
    finally:
        shutdown(world)


def _train(cfg: TrainConfig, resume: bool, progress: bool, world: World) -> dict:
    run = Path(cfg.run_dir)
    if world.size > 1 and cfg.grad_accum % world.size:
        raise DataError(f"grad_accum ({cfg.grad_accum}) must be a multiple of the {world.size} processes")
    if world.size > 1 and resume:
        raise DataError("--resume runs on one process; start it without torchrun")
    saved = run / "train.json"
    if resume:
        if not (run / "checkpoint" / "trainer.pt").is_file():
            raise DataError(f"nothing to resume in {run}: no checkpoint/trainer.pt")
        previous = json.loads(saved.read_text())
        changed = sorted(k for k, v in cfg.to_json().items() if previous.get(k) != v and k != "steps")
        if changed:
            raise DataError(f"{run} was trained with another config (differs in {changed}); use a new run_dir")
    sources = discover(cfg.data)
    # Rank 0 trains the tokenizer and fills the shard cache; the others then read both.
    for turn in (True, False):
        if world.main == turn:
            if world.main:
                run.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
            tokenizer = _tokenizer(cfg, run, sources)
            shards = build_shards(sources, tokenizer, cfg.cache_dir, cfg.eval_fraction, progress)
        barrier(world)
    config = preset(cfg.preset, **{"vocab_size": tokenizer.get_vocab_size(), **cfg.model})
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.get_vocab_size()} ids but the model only {config.vocab_size}")

    torch.manual_seed(cfg.seed)
    model = HylaForCausalLM(config)
    model.reset_parameters(seed=cfg.seed)
    precision = Precision.resolve(cfg)
    model.to(precision.device)
    if world.mesh is not None:
        parallelize(model, world.mesh)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    batches = packed_batches(shards["train"], cfg.tokens_per_batch, cfg.max_seq_len, seed=cfg.seed)
    start = tokens_seen = 0
    if resume:
        state = torch.load(run / "checkpoint" / "trainer.pt", weights_only=False)
        model.load_state_dict(load(run / "checkpoint" / "model").state_dict())
        if state["optimizer"] is None:
            raise DataError(f"{run} was trained sharded (torchrun), which keeps no optimizer state to resume from")
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, tokens_seen = state["step"], state["tokens"]
        for _ in range(start * cfg.grad_accum):  # the same batches as an uninterrupted run
            next(batches)

    stop = {"now": False}
    previous_handlers = {s: signal.signal(s, lambda *_: stop.update(now=True)) for s in (signal.SIGINT, signal.SIGTERM)}
    metrics: dict = {}
    model.train()
    try:
        # A new run starts its metrics afresh; only rank 0 writes them.
        log_path = run / "metrics.jsonl" if world.main else Path(os.devnull)
        with log_path.open("a" if resume else "w") as log, tqdm(
            total=cfg.steps, initial=start, disable=not progress, unit="step"
        ) as bar:  # fmt: skip
            for step in range(start, cfg.steps):
                began = time.perf_counter()
                lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, tokens = 0.0, 0
                for micro in range(cfg.grad_accum):
                    batch, cu_seqlens = next(batches)
                    if micro % world.size != world.rank:
                        continue
                    batch, cu_seqlens = precision.move(batch, cu_seqlens)
                    with precision.autocast():
                        out = model(batch, labels=batch, cu_seqlens=cu_seqlens, return_logits=False)
                    # x N: FSDP averages the N ranks' gradients, and each rank saw 1/N of the micro-batches.
                    scale = world.size / cfg.grad_accum
                    ((out.loss + config.router_aux_loss_coef * out.aux_loss) * scale).backward()
                    loss_sum += out.loss.item() / cfg.grad_accum
                    tokens += batch.shape[1]
                loss_sum, tokens = all_reduce_sum([loss_sum, tokens], world)
                tokens = int(tokens)
                grad_norm = to_float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tokens_seen += tokens
                metrics = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                           "tokens": tokens_seen, "tokens_per_s": tokens / (time.perf_counter() - began)}  # fmt: skip
                if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                    metrics["eval_loss"] = evaluate(
                        model, shards["eval"] if len(shards["eval"]) else shards["train"], cfg, precision
                    )
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                bar.update()
                if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or stop["now"]:
                    _save_checkpoint(run, model, optimizer, step + 1, tokens_seen, world)
                if stop["now"]:
                    break
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if "eval_loss" in metrics and not stop["now"]:
        held_out = shards["eval"] if len(shards["eval"]) else shards["train"]
        final_loss = evaluate_all(model, held_out, cfg, precision)  # every rank: the model may be sharded
        if world.main:
            summary = report(run, shards["train"], final_loss, tokenizer.get_vocab_size())
            summary["held_out_tokens"] = len(np.asarray(held_out.tokens))
            summary["samples"] = samples(load(run / "checkpoint" / "model"), tokenizer, seed=cfg.seed)
            (run / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
            metrics = {**metrics, **summary}
    return metrics
