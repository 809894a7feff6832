"""The engine loop, fed by asyncio: what the HTTP server talks to.

One thread owns the :class:`~hyla.serve.engine.LLMEngine` and loops ``step()`` while there is work; the
server's coroutines hand it new requests and aborts through a command list and receive each step's outputs
through per-request ``asyncio.Queue``s. Tensor work releases the GIL, so the event loop keeps serving.

``hyla serve`` runs the loop on the main thread and the HTTP server on another: on this CPU build of torch,
OpenMP-parallel ops called from a secondary thread ran 2x slower (measured, RESULTS.md), so the thread that does
the tensor work is the main one. Tests start the loop on a thread instead.

The threading contract:

- The engine thread alone calls the :class:`~hyla.serve.engine.LLMEngine`'s methods that change state
  (``add_request``, ``abort``, ``step``) and writes its state (scheduler, pools, output processor, metrics
  totals). Everything else reaches it through :meth:`AsyncEngine._submit` (a list under ``_lock``), run by the
  engine thread before its next step.
- The event loop (and the worker threads it tokenizes on) may call ``engine.inputs`` (``encode``, ``check``:
  reads of the tokenizer and the fixed config), read ``draining`` (a bool) and ``num_waiting()`` (the length of
  the scheduler's queue and ``_pending``, under ``_lock``), and receive outputs through its request queues
  (``call_soon_threadsafe``).
- A ``/metrics`` scrape (the event loop) reads single numbers the engine thread writes: queue lengths, free
  counts of the pools, the metrics' totals. Each read is atomic under the GIL; a scrape may see one step's
  values mixed with the next's, never a torn number.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from hyla.errors import RequestError
from hyla.serve.engine import LLMEngine
from hyla.serve.metrics import EngineMetrics
from hyla.serve.outputs import RequestOutput
from hyla.serve.sampling import SamplingParams


class EngineBusy(RuntimeError):
    """The waiting queue is full, or the server is shutting down (the server answers 503)."""


class EngineStopped(RuntimeError):
    """The engine stopped (a shutdown's grace period ran out) before the request finished."""


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        max_waiting: int = 256,
        metrics: EngineMetrics | None = None,
        start_thread: bool = True,
    ) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics or EngineMetrics(engine)
        self._commands: list[Callable[[], None]] = []
        self._pending = 0  # sequences of requests submitted but not yet added to the scheduler
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self.draining = False  # set once a shutdown began: no new requests
        self._thread = None
        if start_thread:
            self._thread = threading.Thread(target=self.run, name="hyla-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _submit(self, command: Callable[[], None]) -> None:
        with self._lock:
            self._commands.append(command)
        self._wake.set()

    def run(self, stop: threading.Event | None = None, grace_s: float = 5.0) -> tuple[int, int]:
        """The engine loop, until :meth:`shutdown` or, once ``stop`` is set, a graceful shutdown: new requests
        are refused (:class:`EngineBusy`), running ones go on for up to ``grace_s`` seconds, and those left then
        end with :class:`EngineStopped`. Returns ``(finished, ended)``: the sequences that finished after
        ``stop`` and those ended at the deadline."""
        deadline, in_flight = None, 0
        while not self._stopped:
            if deadline is None and stop is not None and stop.is_set():
                self.draining = True
                deadline = time.monotonic() + grace_s
                in_flight = self.engine.outputs.num_sequences()
            with self._lock:
                commands, self._commands = self._commands, []
                self._wake.clear()
            for command in commands:
                command()
            if deadline is not None and (not self.engine.has_work() or time.monotonic() >= deadline):
                ended = self.engine.outputs.num_sequences()
                self._end_all(EngineStopped(f"the server shut down before this request finished ({grace_s:g} s "
                                            "grace period)"))  # fmt: skip
                return in_flight - ended, ended
            if not self.engine.has_work():
                self._wake.wait(timeout=0.1 if stop is not None else 0.5)
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # a failed step fails its requests, not the server
                self._end_all(error)
                continue
            self.metrics.on_step(outputs, self.engine.last_stats)
            for out in outputs:
                self._deliver(out.request_id, out)
        return 0, 0

    def _end_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self._deliver(request_id, error)

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def num_waiting(self) -> int:
        """Sequences waiting for a slot: the scheduler's queue and the requests not handed to it yet."""
        return len(self.engine.scheduler.waiting) + self._pending

    def admit(self, num_sequences: int) -> None:
        """Raise unless a request of ``num_sequences`` sequences (prompts x n) may queue now:
        :class:`~hyla.errors.RequestError` (400) for one larger than the whole queue, :class:`EngineBusy` (503)
        when the server is shutting down or the queue has no room for it. Cheap: called before any tokenizing."""
        if num_sequences > self.max_waiting:
            raise RequestError("n", f"the request asks for {num_sequences:,} sequences (prompts x n); this server "
                               f"queues at most {self.max_waiting} (hyla serve --max-waiting)")  # fmt: skip
        if self.draining:
            raise EngineBusy("the server is shutting down; retry on another server or later")
        if self.num_waiting() + num_sequences > self.max_waiting:
            raise EngineBusy(f"the server is at capacity ({self.num_waiting()} sequences waiting, at most "
                             f"{self.max_waiting}); retry later")  # fmt: skip

    async def generate(self, prompts: list[list[int]], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the outputs of ``n`` sequences per prompt as steps produce them, until all have finished.

        Raises :class:`~hyla.errors.RequestError` before anything runs if a prompt cannot fit, and
        :class:`EngineBusy` if the queue is full or the server is shutting down. Leaving early (a client gone:
        the generator closed or its task cancelled) aborts the request before the engine's next step.
        """
        limits = self.engine.inputs.check(prompts, params)  # the one check: add_request takes its limits
        remaining = len(prompts) * params.n
        self.admit(remaining)
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), queue)

        def add() -> None:
            with self._lock:
                self._pending -= len(prompts) * params.n
            try:
                self.engine.add_request(request_id, prompts, params, limits)
            except Exception as error:
                self._deliver(request_id, error)

        with self._lock:
            self._pending += remaining
        self._submit(add)
        timer = self.metrics.request_timer()
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                timer.on_output(item, time.monotonic())
                remaining -= item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if remaining:
                self._submit(lambda: self.engine.abort(request_id))
            timer.done(time.monotonic())
