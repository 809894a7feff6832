"""A live server on loopback for the API tests: a small random model, uvicorn in a thread."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from hyla.serve.api import build_app
from hyla.serve.async_engine import AsyncEngine
from hyla.serve.engine import EngineConfig, LLMEngine
from tests.model.test_parity import PATTERNS, random_model

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


@pytest.fixture(scope="module")
def engine():
    engine = make_engine()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def base_url(engine):
    with live_server(engine, API_KEY) as url:
        yield url
