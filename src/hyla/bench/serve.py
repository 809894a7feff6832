"""``hyla bench serve``: a load generator against an OpenAI-compatible server.

``concurrency`` clients each send streaming completions of random token-id prompts (``input_len`` tokens,
exactly ``output_len`` generated: ``ignore_eos``) one after another until ``num_requests`` are done.
Per request: time to first token (the first streamed chunk), time per output token after it, and latency.
Reported: requests/s, output tokens/s, TTFT and TPOT (median and p99), and the cost of a million output
tokens at a given hourly machine price.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass

import httpx2


@dataclass
class RequestRecord:
    ttft: float
    latency: float
    output_tokens: int

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / max(self.output_tokens - 1, 1)


@dataclass
class LoadResult:
    concurrency: int
    records: list[RequestRecord]
    wall: float

    @property
    def output_tokens_per_s(self) -> float:
        return sum(r.output_tokens for r in self.records) / self.wall

    @property
    def requests_per_s(self) -> float:
        return len(self.records) / self.wall

    def percentile(self, name: str, q: float) -> float:
        values = sorted(getattr(r, name) for r in self.records)
        return values[min(int(q * len(values)), len(values) - 1)]

    def cost_per_million(self, price_per_hour: float) -> float:
        return price_per_hour / (self.output_tokens_per_s * 3600) * 1e6

    def row(self, price_per_hour: float) -> dict:
        return {
            "concurrency": self.concurrency,
            "requests": len(self.records),
            "req_s": self.requests_per_s,
            "out_tok_s": self.output_tokens_per_s,
            "ttft_p50_ms": 1e3 * statistics.median(r.ttft for r in self.records),
            "ttft_p99_ms": 1e3 * self.percentile("ttft", 0.99),
            "tpot_p50_ms": 1e3 * statistics.median(r.tpot for r in self.records),
            "tpot_p99_ms": 1e3 * self.percentile("tpot", 0.99),
            "usd_per_1m_out": self.cost_per_million(price_per_hour),
        }


async def _one(client: httpx2.AsyncClient, url: str, body: dict) -> RequestRecord:
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None:
                ttft = time.perf_counter() - start
    return RequestRecord(ttft if ttft is not None else float("nan"), time.perf_counter() - start, tokens)


async def run_load(
    base_url: str,
    concurrency: int,
    num_requests: int,
    input_len: int,
    output_len: int,
    api_key: str | None = None,
    seed: int = 0,
) -> LoadResult:
    """Drive ``base_url`` (``http://host:port/v1``) with ``concurrency`` clients; see the module docstring."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx2.AsyncClient(headers=headers, timeout=None) as client:
        try:
            response = await client.get(f"{base_url}/models")
        except httpx2.TransportError as e:
            raise ValueError(f"cannot reach a server at {base_url} ({e}); start one with `hyla serve DIR`") from None
        if response.status_code != 200:
            raise ValueError(f"{base_url}/models answered {response.status_code}: {response.text[:200]}")
        card = response.json()["data"][0]
        rng = random.Random(seed)
        prompts = [[rng.randrange(card.get("vocab_size", 256)) for _ in range(input_len)] for _ in range(num_requests)]
        queue = list(reversed(prompts))
        records: list[RequestRecord] = []

        async def worker() -> None:
            while queue:
                body = {"model": card["id"], "prompt": queue.pop(), "max_tokens": output_len, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
                records.append(await _one(client, f"{base_url}/completions", body))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return LoadResult(concurrency, records, wall)


def format_table(rows: list[dict]) -> str:
    header = "| " + " | ".join(rows[0]) + " |"
    lines = [header, "|" + "---|" * len(rows[0])]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines)


def main(base_url: str, concurrency: list[int], num_requests: int | None, input_len: int, output_len: int,
         price_per_hour: float, api_key: str | None) -> list[dict]:  # fmt: skip
    """Run each concurrency level (``num_requests`` default: ``max(4, 2 * concurrency)``) and print a table."""
    rows = []
    for c in concurrency:
        n = num_requests or max(4, 2 * c)
        result = asyncio.run(run_load(base_url, c, n, input_len, output_len, api_key))
        rows.append(result.row(price_per_hour))
        print(format_table(rows[-1:]).splitlines()[-1] if len(rows) > 1 else format_table(rows), flush=True)
    return rows
