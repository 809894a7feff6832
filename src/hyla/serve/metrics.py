"""Prometheus metrics of a serving engine: queue lengths, cache use, token counts and rates, latencies."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from hyla.serve.engine import LLMEngine
from hyla.serve.outputs import RequestOutput
from hyla.serve.scheduler import StepStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0


class EngineMetrics:
    """One registry per engine (so that tests and several servers in a process do not collide)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        scheduler, cache = engine.scheduler, engine.cache
        Gauge("hyla_requests_running", "Sequences being generated", registry=r).set_function(
            lambda: len(scheduler.running)
        )
        Gauge("hyla_requests_waiting", "Sequences waiting for a slot", registry=r).set_function(
            lambda: len(scheduler.waiting)
        )
        Gauge("hyla_kv_cache_usage", "Fraction of the paged KV blocks in use", registry=r).set_function(
            lambda: 1 - cache.blocks.num_free / cache.blocks.num_blocks
        )
        Gauge("hyla_state_slots_usage", "Fraction of the lightning state slots in use", registry=r).set_function(
            lambda: 1 - cache.slots.num_free / cache.slots.num
        )
        # Totals of the engine's StepStats, added up on the engine thread (on_step); a scrape reads them.
        self.totals = StepStats()
        totals = self.totals
        Gauge("hyla_prefix_cache_hit_rate", "Share of prompt tokens read from the prefix cache since the start",
              registry=r).set_function(lambda: totals.hit_tokens / max(totals.queried_tokens, 1))  # fmt: skip
        Gauge("hyla_prefix_cache_snapshots_usage", "Fraction of the lightning-state snapshot pool in use",
              registry=r).set_function(lambda: cache.snapshots.num_used / max(cache.snapshots.num, 1))  # fmt: skip
        Gauge("hyla_prefix_cache_hit_tokens", "Prompt tokens read from the prefix cache since the start",
              registry=r).set_function(lambda: totals.hit_tokens)  # fmt: skip
        Gauge("hyla_preemptions", "Requests preempted since the start", registry=r).set_function(
            lambda: totals.preemptions
        )
        Gauge("hyla_spec_draft_tokens", "Tokens drafted for speculative decoding since the start",
              registry=r).set_function(lambda: totals.draft_tokens)  # fmt: skip
        Gauge("hyla_spec_accepted_tokens", "Drafted tokens accepted since the start",
              registry=r).set_function(lambda: totals.accepted_tokens)  # fmt: skip
        Gauge("hyla_spec_acceptance_rate", "Share of drafted tokens accepted since the start",
              registry=r).set_function(lambda: totals.accepted_tokens / max(totals.draft_tokens, 1))  # fmt: skip
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._lock = threading.Lock()  # the engine thread appends, the server thread reads
        Gauge("hyla_generation_tokens_per_second", f"Output tokens/s over the last {RATE_WINDOW_S:.0f} s",
              registry=r).set_function(self._rate)  # fmt: skip
        self.prompt_tokens = Counter("hyla_prompt_tokens", "Prompt tokens computed", registry=r)
        self.generation_tokens = Counter("hyla_generation_tokens", "Output tokens generated", registry=r)
        self.ttft = Histogram("hyla_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)  # fmt: skip
        self.tpot = Histogram("hyla_time_per_output_token_seconds", "Time between output tokens", registry=r,
                              buckets=LATENCY_BUCKETS)  # fmt: skip
        self.latency = Histogram("hyla_request_latency_seconds", "Request latency, end to end", registry=r,
                                 buckets=LATENCY_BUCKETS)  # fmt: skip

    def on_step(self, outputs: list[RequestOutput], stats: StepStats) -> None:
        """Called by the engine thread after each step, with the step's outputs and statistics."""
        tokens = sum(len(o.token_ids) for o in outputs)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, tokens))
        self.generation_tokens.inc(tokens)
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.totals.add(stats)

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def request_timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """Latencies of one request, seen from the server: first token, the gaps between tokens, the whole."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self.metrics = metrics
        self.start = self.last = time.monotonic()
        self.first = True

    def on_output(self, out: RequestOutput, now: float) -> None:
        if not out.token_ids:
            return
        if self.first:
            self.metrics.ttft.observe(now - self.start)
            self.first = False
        else:
            self.metrics.tpot.observe((now - self.last) / len(out.token_ids))
        self.last = now

    def done(self, now: float) -> None:
        self.metrics.latency.observe(now - self.start)
