"""``hyla bench serve``: a load generator against any OpenAI-compatible server (hyla, llama-server, vLLM, ...).

Workloads:

- ``random``: ``concurrency`` clients each send streaming completions of random token-id prompts
  (``input_len`` tokens, exactly ``output_len`` generated: ``ignore_eos``) one after another.
- ``chat``: ``concurrency`` conversations of ``turns`` turns through ``/v1/chat/completions``, all opening with
  one shared system prompt (``system_words`` words); every turn sends the whole conversation so far (as chat
  clients do), a new user message of ``user_words`` words, and gets ``output_len`` tokens back.
- ``agent``: ``concurrency`` agents, each one transcript sent to ``/v1/completions`` ``turns`` times, growing by
  the model's reply and a tool result of ``user_words`` words per call (a coding agent's loop).

Text is made of seeded random words (no data to download). Per request: time to first token (the first
streamed chunk), time per output token after it, latency, and the prompt tokens the server reports as read from
its prefix cache (OpenAI's ``usage.prompt_tokens_details.cached_tokens``; 0 where a server does not say).
Reported per level: requests/s, output tokens/s, TTFT (median and p99; for chat and agent also of the first
turn and of the turns after it), TPOT, the prefix-hit rate and the cost of a million output tokens.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2

from hyla.errors import ConfigError, HylaError

WORKLOADS = ("random", "chat", "agent")
# Words of the generated text: common English and code words, so that a BPE finds tokens of a few bytes each.
_VOCABULARY = (
    "the of and to in is that for it as with was on be by this are or from at an but not have which you all can "
    "def return self import class if else for while try except with as yield lambda None True False print len "
    "range list dict str int float file path value key data result error request model token cache state layer "
    "attention block user system assistant tool call output input query answer test run build step"
)
_WORDS = _VOCABULARY.split()


@dataclass
class RequestRecord:
    ttft: float
    latency: float
    output_tokens: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    turn: int = 0  # 0: a conversation's first request

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / max(self.output_tokens - 1, 1)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(int(0.99 * len(values)), len(values) - 1)] if values else float("nan")


@dataclass
class LoadResult:
    concurrency: int
    records: list[RequestRecord]
    wall: float
    workload: str = "random"

    @property
    def output_tokens_per_s(self) -> float:
        return sum(r.output_tokens for r in self.records) / self.wall

    @property
    def requests_per_s(self) -> float:
        return len(self.records) / self.wall

    @property
    def prefix_hit_rate(self) -> float:
        return sum(r.cached_tokens for r in self.records) / max(sum(r.prompt_tokens for r in self.records), 1)

    def percentile(self, name: str, q: float) -> float:
        values = sorted(getattr(r, name) for r in self.records)
        return values[min(int(q * len(values)), len(values) - 1)]

    def cost_per_million(self, price_per_hour: float) -> float:
        return price_per_hour / (self.output_tokens_per_s * 3600) * 1e6

    def row(self, price_per_hour: float) -> dict:
        """The level's figures; the per-turn TTFT columns only for workloads with turns (chat, agent)."""
        later = [r.ttft for r in self.records if r.turn > 0]
        turns = {
            "ttft_turn1_p50_ms": 1e3 * _median([r.ttft for r in self.records if r.turn == 0]),
            "ttft_later_p50_ms": 1e3 * _median(later),
            "ttft_later_p99_ms": 1e3 * _p99(later),
        }
        return {
            "workload": self.workload,
            "concurrency": self.concurrency,
            "requests": len(self.records),
            "req_s": self.requests_per_s,
            "out_tok_s": self.output_tokens_per_s,
            "ttft_p50_ms": 1e3 * _median([r.ttft for r in self.records]),
            "ttft_p99_ms": 1e3 * _p99([r.ttft for r in self.records]),
            **(turns if self.workload != "random" else {}),
            "tpot_p50_ms": 1e3 * _median([r.tpot for r in self.records]),
            "tpot_p99_ms": 1e3 * _p99([r.tpot for r in self.records]),
            "prefix_hit_rate": self.prefix_hit_rate,
            "usd_per_1m_out": self.cost_per_million(price_per_hour),
        }


class ServerError(HylaError):
    """The server answered something the load generator cannot measure."""


async def _one(client: httpx2.AsyncClient, url: str, body: dict, turn: int) -> tuple[RequestRecord, str]:
    """Send one streamed request; returns its record and the text it generated."""
    start = time.perf_counter()
    ttft, usage, text = None, None, []
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise ServerError(f"the server answered {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise ServerError(f"the server sent an error: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
                if ttft is None:
                    ttft = time.perf_counter() - start
    if not usage or "completion_tokens" not in usage:
        raise ServerError(f"{url} sent no usage with stream_options.include_usage: this benchmark counts tokens "
                          "from it; use a server that reports usage (hyla, vLLM, llama-server)")  # fmt: skip
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    record = RequestRecord(ttft if ttft is not None else float("nan"), time.perf_counter() - start,
                           usage["completion_tokens"], usage.get("prompt_tokens", 0), cached, turn)  # fmt: skip
    return record, "".join(text)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


async def run_load(
    base_url: str,
    concurrency: int,
    num_requests: int,
    input_len: int,
    output_len: int,
    api_key: str | None = None,
    seed: int = 0,
    workload: str = "random",
    turns: int = 4,
    system_words: int = 400,
    user_words: int = 60,
    vocab: int | None = None,
    warmup: int = 0,
) -> LoadResult:
    """Drive ``base_url`` (``http://host:port/v1``) with ``concurrency`` clients; see the module docstring.
    ``num_requests`` counts requests for ``random``; ``chat`` and ``agent`` send ``concurrency x turns``.
    ``random`` prompts draw ids below ``vocab`` (default: the vocabulary the server's model card names).
    ``warmup`` requests (short completions, not recorded) go first: a server's first request pays one-time costs
    (allocations, caches) that are not its steady state."""
    if workload not in WORKLOADS:
        raise ConfigError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # A new connection per request: a kept-alive one that the server closed meanwhile (llama-server does) fails
    # the next request with "Server disconnected"; a loopback connect costs ~0.1 ms.
    limits = httpx2.Limits(max_keepalive_connections=0)
    async with httpx2.AsyncClient(headers=headers, timeout=None, limits=limits) as client:
        try:
            response = await client.get(f"{base_url}/models")
        except httpx2.TransportError as e:
            raise ServerError(f"cannot reach a server at {base_url} ({e}); start one with `hyla serve DIR`") from None
        if response.status_code != 200:
            raise ServerError(f"{base_url}/models answered {response.status_code}: {response.text[:200]}")
        card = response.json()["data"][0]
        rng = random.Random(seed)
        records: list[RequestRecord] = []
        common = {"model": card["id"], "max_tokens": output_len, "temperature": 0, "stream": True,
                  "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
        for _ in range(warmup):
            body = {**common, "prompt": _words(random.Random(-1), 16), "max_tokens": 4}
            await _one(client, f"{base_url}/completions", body, 0)

        async def random_client(queue: list[list[int]]) -> None:
            while queue:
                record, _ = await _one(client, f"{base_url}/completions", {**common, "prompt": queue.pop()}, 0)
                records.append(record)

        async def conversation(system: str, rng: random.Random) -> None:
            messages = [{"role": "system", "content": system}]
            for turn in range(turns):
                messages.append({"role": "user", "content": _words(rng, user_words)})
                body = {**common, "messages": messages}
                record, reply = await _one(client, f"{base_url}/chat/completions", body, turn)
                records.append(record)
                messages.append({"role": "assistant", "content": reply})

        async def agent(system: str, rng: random.Random) -> None:
            transcript = system + "\n"
            for turn in range(turns):
                record, reply = await _one(client, f"{base_url}/completions", {**common, "prompt": transcript}, turn)
                records.append(record)
                transcript += reply + "\ntool result: " + _words(rng, user_words) + "\n"

        if workload == "random":
            vocab = vocab or card.get("vocab_size") or (card.get("meta") or {}).get("n_vocab", 256)  # hyla, llama.cpp
            prompts = [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(num_requests)]
            queue = list(reversed(prompts))
            tasks = [random_client(queue) for _ in range(concurrency)]
        else:
            system = _words(rng, system_words)  # shared by every conversation: a server-wide system prompt
            run = conversation if workload == "chat" else agent
            tasks = [run(system, random.Random(seed * 1000 + i + 1)) for i in range(concurrency)]
        start = time.perf_counter()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return LoadResult(concurrency, records, wall, workload)


def free_port() -> int:
    """A loopback port nobody listens on now, for a server a benchmark or test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(model_dir: str | Path, *flags: str, timeout: float = 600.0) -> tuple[subprocess.Popen, str]:
    """Start ``hyla serve MODEL_DIR FLAGS...`` on a free loopback port, for a benchmark to drive; returns the
    process (stop it with SIGTERM) and its ``/v1`` URL once it accepts connections (a cold compile of the decode
    steps, on by default, can take minutes). Its log goes to a temporary file (a pipe nobody reads during the run
    could fill and stall the server), shown if it fails to start."""
    port = free_port()
    cmd = [sys.executable, "-m", "hyla", "serve", str(model_dir), "--port", str(port), *flags]
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryFile("w+") as log:  # the server keeps writing to it after this handle closes
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return server, f"http://127.0.0.1:{port}/v1"
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    server.wait()
                    log.seek(0)
                    raise RuntimeError(f"hyla serve did not start:\n{log.read()[-3000:]}") from None
                time.sleep(0.2)


def format_table(rows: list[dict]) -> str:
    header = "| " + " | ".join(rows[0]) + " |"
    lines = [header, "|" + "---|" * len(rows[0])]
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row.values()) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "—" if value != value else f"{value:.3g}"  # NaN: nothing measured (no request had a first token)
    return str(value)


def main(base_url: str, concurrency: list[int], num_requests: int | None, input_len: int, output_len: int,
         price_per_hour: float, api_key: str | None, workload: str = "random", turns: int = 4,
         system_words: int = 400, user_words: int = 60) -> list[dict]:  # fmt: skip
    """Run each concurrency level (``num_requests`` default: ``max(4, 2 * concurrency)``) and print a table; one
    warm-up request goes first."""
    print(f"# {workload} workload against {base_url}; $ per 1M output tokens at ${price_per_hour:.2f} an hour of "
          "the machine (--price-per-hour)", flush=True)  # fmt: skip
    rows = []
    for i, c in enumerate(concurrency):
        n = num_requests or max(4, 2 * c)
        result = asyncio.run(run_load(base_url, c, n, input_len, output_len, api_key, workload=workload,
                                      turns=turns, system_words=system_words, user_words=user_words,
                                      warmup=int(i == 0)))  # fmt: skip
        rows.append(result.row(price_per_hour))
        print(format_table(rows[-1:]).splitlines()[-1] if len(rows) > 1 else format_table(rows), flush=True)
    return rows
