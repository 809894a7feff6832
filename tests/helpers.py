"""Helpers the tests share (no test imports another test module's helpers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import hyla
from hyla.config import LIGHTNING, SOFTMAX, hybrid_layer_types
from hyla.serve.api import build_app
from hyla.serve.async_engine import AsyncEngine
from hyla.serve.engine import EngineConfig, LLMEngine


def byte_tokenizer(num_ids: int = 256) -> Tokenizer:
    """Byte-level tokens without merges, the first ``num_ids`` of the 256 (ids in byte-level BPE's alphabet
    order): a tokenizer as small as a small test model's vocabulary. Text with other bytes cannot be encoded;
    tests of such models feed token ids."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[:num_ids]
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


PATTERNS = {
    "hybrid-7:1": hybrid_layer_types(8),
    "alternating": [SOFTMAX, LIGHTNING] * 2,
    "all-lightning": [LIGHTNING] * 3,
    "all-softmax": [SOFTMAX] * 2,
}


def random_model(**overrides) -> hyla.HylaForCausalLM:
    """A tiny model with every weight random, norms included, and DeepNorm factors that are not 1."""
    layer_types = overrides.pop("layer_types", PATTERNS["hybrid-7:1"])
    config = hyla.preset(
        "tiny",
        layer_types=layer_types,
        num_hidden_layers=len(layer_types),
        block_size=16,
        linear_attn_alpha_factor=1.7,
        full_attn_alpha_factor=1.3,
        mlp_alpha_factor=2.1,
        mlp_beta_factor=0.9,
        **overrides,
    )
    model = hyla.HylaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
    return model


WORDS = ("def", "return", "import", "class", "lambda", "yield", "while", "for", "if", "else", "try", "except")


def small_corpus(root, n=40):
    """A directory of small Python-like files, varied lengths, made from a seeded generator."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) for _ in range(rng.integers(1, 30))]
        (root / f"f{i:03d}.py").write_text("\n".join(lines) + "\n")
    return root


def full_forward_greedy(model, prompt: list[int], max_tokens: int, vocab: int = 256) -> list[int]:
    """The reference decode: a full forward over the whole sequence for every new token (greedy, ids < vocab)."""
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = model(seq).logits[0, -1, :vocab].argmax()
            seq = torch.cat((seq, nxt.view(1, 1)), dim=1)
    return seq[0, len(prompt) :].tolist()


TRAIN = ["--preset", "tiny", "--vocab-size", "300", "--tokens-per-batch", "256", "--max-seq-len", "64",
         "--eval-every", "4", "--eval-batches", "1", "--eval-fraction", "0.1", "--warmup", "2",
         "--set", "hidden_size=32", "--set", "intermediate_size=32"]  # fmt: skip


def train_args(tmp_path, run: str, steps: int) -> list[str]:
    return ["train", "--run-dir", str(tmp_path / run), "--data", str(tmp_path / "corpus"), "--steps", str(steps),
            "--cache-dir", str(tmp_path / "cache"), *TRAIN]  # fmt: skip


# A sweep grid's [base] and [model] for tiny runs (the recall-task tests drop the data and vocabulary lines).
SWEEP_BASE = """
[base]
vocab_size = 300
tokens_per_batch = 256
max_seq_len = 64
eval_every = 4
eval_batches = 1
eval_fraction = 0.1
warmup = 1
data = "{data}"
cache_dir = "{cache}"
[model]
num_experts = 2
num_experts_per_tok = 1
block_size = 16
"""


def grid_file(tmp_path, grid: str):
    """A sweep grid file of tiny runs on a small corpus under ``tmp_path``: the shared [base] and [model], then
    ``grid``."""
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        small_corpus(corpus, n=20)
    path = tmp_path / "grid.toml"
    path.write_text(SWEEP_BASE.format(data=corpus, cache=tmp_path / "cache") + grid)
    return path


# -- a live server on loopback: a small random model, uvicorn in a thread --------------------------------

MODEL = "hyla-test"
API_KEY = "sk-test"


def ascii_tokenizer() -> Tokenizer:
    """Printable ASCII, space and newline, one id each: whatever a random model samples decodes to clean text.

    (Byte-level BPE writes space and newline as "Ġ" and "Ċ", every other printable byte as itself.)
    """
    chars = ["Ġ", "Ċ"] + [chr(b) for b in range(33, 127)]
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


@contextmanager
def live_server(engine: AsyncEngine, api_key: str | None = None, **app_args) -> Iterator[str]:
    """Serve ``engine`` on a free loopback port; yields the base URL (``http://127.0.0.1:PORT/v1``)."""
    app = build_app(engine, MODEL, api_key, **app_args)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def make_engine(step_delay: float = 0.0, start_thread: bool = True, **config) -> AsyncEngine:
    """An engine over a random model; ``step_delay`` seconds added to every step make a slow model (for
    tests of what happens while requests are still running)."""
    torch.manual_seed(0)
    model = random_model(layer_types=PATTERNS["alternating"])
    max_waiting = config.pop("max_waiting", 64)
    defaults = dict(max_num_seqs=4, max_num_batched_tokens=64, block_size=8, max_model_len=256)
    engine = LLMEngine(model, ascii_tokenizer(), EngineConfig(**{**defaults, **config}))
    if step_delay:
        execute = engine.runner.execute

        def slow(*args):
            time.sleep(step_delay)
            return execute(*args)

        engine.runner.execute = slow
    return AsyncEngine(engine, max_waiting, start_thread=start_thread)


def wait_for(condition, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds (a hang, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
