"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health, metrics.

Errors use OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``: 400 for an invalid parameter
(named in ``param``) or a prompt longer than the context, 401 for a missing or wrong API key (when the
server has one), 404 for an unknown model, 413 for a body over the size limit, 503 when the waiting queue is
full or the server is shutting down.

Chat prompts come from the model directory's ``tokenizer_config.json`` ``chat_template`` (Jinja, as in
transformers; rendered in jinja2's sandbox, see :class:`~hyla.data.tokenizer.ChatTemplate`) or, without one,
:data:`~hyla.data.tokenizer.DEFAULT_CHAT_TEMPLATE`: one ``role: content`` line per message, then
``assistant:``.

The routes are module-level functions reading the one :class:`ServerState` in ``app.state.hyla``; tokenizing
runs in a worker thread, so that a long prompt does not hold up the event loop. A client that goes away
aborts its request, streamed or not, before the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tokenizers import Tokenizer
from uvicorn.protocols.http.h11_impl import H11Protocol

from hyla.data.tokenizer import ChatTemplate, token_bytes
from hyla.errors import ConfigError, RequestError
from hyla.serve.async_engine import AsyncEngine, EngineBusy, EngineStopped
from hyla.serve.config import DEFAULT_MAX_REQUEST_BYTES, ServerConfig
from hyla.serve.engine import EngineConfig, LLMEngine
from hyla.serve.outputs import RequestOutput, TokenLogprob
from hyla.serve.protocol import ChatCompletionRequest, CompletionRequest
from hyla.serve.runner import COMPILED_MAX_BATCH, compile_choice
from hyla.serve.sampling import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status)


def _api_error(error: Exception) -> APIError:
    """The envelope of an engine-side failure: 503 when the server stopped, else 500."""
    if isinstance(error, EngineStopped):
        return APIError(503, str(error), "service_unavailable", code="server_shutting_down")
    if isinstance(error, APIError):
        return error
    return APIError(500, f"internal error: {type(error).__name__}: {error}", "internal_error")


@dataclass
class ServerState:
    """What the routes share: the engine, the served name, the key and the chat template."""

    engine: AsyncEngine
    model_name: str
    api_key: str | None
    template: ChatTemplate

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.engine.tokenizer


def _state(request: Request) -> ServerState:
    return request.app.state.hyla


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 without being read further (checked
    against ``Content-Length`` first, then counted as it arrives)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(int(declared), send)
        body: list[Message] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                body.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(size, send, at_least=True)
            body.append(message)
            more = message.get("more_body", False)

        async def replay() -> Message:
            return body.pop(0) if body else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, size: int, send: Send, at_least: bool = False) -> None:
        size_text = f"{'over ' if at_least else ''}{size:,} bytes"
        message = (f"the request body is {size_text}; this server takes at most {self.max_bytes:,} "
                   "(hyla serve --max-request-bytes)")  # fmt: skip
        response = APIError(413, message, "invalid_request_error", code="request_too_large").response()
        response.headers["connection"] = "close"
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def build_app(
    engine: AsyncEngine,
    model_name: str,
    api_key: str | None = None,
    chat_template: ChatTemplate | str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """The FastAPI app serving ``engine`` as model ``model_name`` (``chat_template``: Jinja source, compiled in
    the sandbox; None: :data:`~hyla.data.tokenizer.DEFAULT_CHAT_TEMPLATE`)."""
    app = FastAPI(title="hyla", docs_url=None, redoc_url=None)
    template = chat_template if isinstance(chat_template, ChatTemplate) else ChatTemplate(chat_template)
    app.state.hyla = ServerState(engine, model_name, api_key, template)
    for error_type, handler in _HANDLERS.items():
        app.add_exception_handler(error_type, handler)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
    v1.add_api_route("/models", models, methods=["GET"])
    v1.add_api_route("/completions", completions, methods=["POST"])
    v1.add_api_route("/chat/completions", chat_completions, methods=["POST"])
    app.include_router(v1)
    return app


# -- errors ----------------------------------------------------------------------------------------------------


async def _on_api_error(request: Request, error: APIError) -> JSONResponse:
    return error.response()


async def _on_request_error(request: Request, error: RequestError) -> JSONResponse:
    return APIError(400, str(error), "invalid_request_error", error.param).response()


async def _on_busy(request: Request, error: EngineBusy) -> JSONResponse:
    return APIError(503, str(error), "service_unavailable", code="server_busy").response()


async def _on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        where = first.get("loc", ("body", "?"))[-1]
        reason = first.get("ctx", {}).get("error") or first.get("msg", "invalid JSON")
        message = f"the request body is not valid JSON: {reason} at byte {where}"
        return APIError(400, message, "invalid_request_error").response()
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
    return APIError(400, message, "invalid_request_error", param).response()


async def _on_http(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return APIError(error.status_code, str(error.detail), "invalid_request_error").response()


async def _on_internal(request: Request, error: Exception) -> JSONResponse:
    return _api_error(error).response()  # a last resort: engine failures are answered in the routes


_HANDLERS: dict[type[Exception], Callable] = {
    APIError: _on_api_error,
    RequestError: _on_request_error,
    EngineBusy: _on_busy,
    RequestValidationError: _on_invalid,
    StarletteHTTPException: _on_http,
    Exception: _on_internal,
}


# -- routes ----------------------------------------------------------------------------------------------------


async def authorize(request: Request) -> None:
    key = _state(request).api_key
    if key is not None and request.headers.get("authorization", "") != f"Bearer {key}":
        raise APIError(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")


async def health(request: Request) -> Response:
    """200 while serving; 503 once a shutdown began (so that a load balancer sends no more)."""
    return Response(status_code=503 if _state(request).engine.draining else 200)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def models(request: Request) -> dict:
    state = _state(request)
    e = state.engine.engine
    card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "hyla",
            "max_model_len": e.config.max_model_len, "vocab_size": e.vocab_size}  # fmt: skip
    return {"object": "list", "data": [card]}


async def completions(body: CompletionRequest, request: Request) -> Any:
    state = _state(request)
    _check_model(state, body.model)
    params = body.sampling_params(body.max_tokens, body.logprobs)
    prompts = body.prompts()
    started = await _start(request, state, prompts, params)
    if started is None:
        return Response(status_code=499)
    ids, outputs = started
    meta = _meta("cmpl", "text_completion", state.model_name)
    tokenizer = state.tokenizer
    echoes = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts] if body.echo else None
    offsets: dict[int, int] = {}  # per sequence: characters returned so far (text_offset)

    def choice(out: RequestOutput, text: str, entries: list[TokenLogprob], first: bool) -> dict:
        if echoes is not None and first:
            text = echoes[out.index // params.n] + text
        lp = None
        if params.logprobs is not None:
            start = offsets.get(out.index, len(echoes[out.index // params.n]) if echoes is not None else 0)
            lp = _completion_logprobs(tokenizer, entries, start)
            offsets[out.index] = start + sum(len(t) for t in lp["tokens"])
        return {"index": out.index, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}

    if body.stream:
        return _sse(
            outputs, meta, ids, body.include_usage, lambda out: choice(out, out.text, out.logprobs, _first(out))
        )
    return await _collect(request, outputs, meta, ids, lambda out, text, lps: choice(out, text, lps, True))


async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = _state(request)
    _check_model(state, body.model)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = body.logprobs_count()
    params = body.sampling_params(max_tokens, logprobs)
    if not body.messages:
        raise APIError(400, "messages must not be empty", "invalid_request_error", "messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = state.template.render(messages)
    started = await _start(request, state, [prompt], params, param="messages")
    if started is None:
        return Response(status_code=499)
    ids, outputs = started
    meta = _meta("chatcmpl", "chat.completion", state.model_name)
    tokenizer = state.tokenizer

    def lp(entries: list[TokenLogprob]) -> dict | None:
        return {"content": _chat_logprobs(tokenizer, entries)} if logprobs is not None else None

    def delta(out: RequestOutput) -> dict:
        d = {"content": out.text}
        if _first(out):  # the first delta names the role
            d = {"role": "assistant", **d}
        return {"index": out.index, "delta": d, "logprobs": lp(out.logprobs), "finish_reason": out.finish_reason}

    if body.stream:
        return _sse(outputs, {**meta, "object": "chat.completion.chunk"}, ids, body.include_usage, delta)

    def message(out: RequestOutput, text: str, lps: list[TokenLogprob]) -> dict:
        return {"index": out.index, "message": {"role": "assistant", "content": text}, "logprobs": lp(lps),
                "finish_reason": out.finish_reason}  # fmt: skip

    return await _collect(request, outputs, meta, ids, message)


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                       "invalid_request_error", "model", "model_not_found")  # fmt: skip


def _meta(prefix: str, kind: str, model_name: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model_name}


async def _start(
    request: Request, state: ServerState, prompts: list[str | list[int]], params: SamplingParams, param: str = "prompt"
) -> tuple[list[list[int]], AsyncIterator[RequestOutput]] | None:
    """Admit (before any work), encode (in a worker thread) and submit; errors before anything runs become 400
    (RequestError, ``param`` naming text that is not valid Unicode), 503 (EngineBusy) or 500. None when the
    client left while the request waited for its first output (then it is aborted, its place in the queue freed)."""
    engine = state.engine
    engine.admit(len(prompts) * params.n)
    ids = await asyncio.to_thread(lambda: [engine.engine.inputs.encode(p, param) for p in prompts])
    stream = engine.generate(ids, params)
    first_output = asyncio.ensure_future(anext(stream))
    gone = asyncio.ensure_future(_until_disconnected(request))
    await asyncio.wait((first_output, gone), return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not first_output.done():  # the client left while queued: abort before it takes a slot
        first_output.cancel()
        await asyncio.gather(first_output, return_exceptions=True)
        await stream.aclose()
        return None
    try:
        first = first_output.result()
    except (RequestError, EngineBusy):
        raise
    except Exception as error:  # a failed engine step: this request fails, the server goes on
        raise _api_error(error) from None

    async def chained() -> AsyncIterator[RequestOutput]:
        yield first
        async for out in stream:
            yield out

    return ids, chained()


def _first(out: RequestOutput) -> bool:
    """Whether this is a sequence's first delta."""
    return out.num_output_tokens == len(out.token_ids)


def _usage(ids: list[list[int]], finals: list[RequestOutput]) -> dict:
    """OpenAI's usage of the finished sequences: each prompt counted once, however many completions (``n``) it
    has, and the prompt tokens read from the prefix cache (those of each prompt's first sequence)."""
    prompt_tokens = sum(len(p) for p in ids)
    completion_tokens = sum(out.num_output_tokens for out in finals)
    n = max(len(finals) // max(len(ids), 1), 1)
    cached = sum(out.num_cached_tokens for out in finals if out.index % n == 0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


async def _until_disconnected(request: Request) -> None:
    """Return once the client has gone (the server's ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, outputs: AsyncIterator[RequestOutput], meta: dict, ids, make_choice) -> Any:
    """A whole (non-streamed) response: each sequence's deltas joined into one choice. A client that leaves
    before the end cancels the collection, which aborts the request in the engine."""
    texts: dict[int, str] = {}
    logprobs: dict[int, list[TokenLogprob]] = {}
    finals: dict[int, RequestOutput] = {}

    async def gather() -> None:
        async for out in outputs:
            texts[out.index] = texts.get(out.index, "") + out.text
            logprobs.setdefault(out.index, []).extend(out.logprobs)
            if out.finished:
                finals[out.index] = out

    collecting = asyncio.ensure_future(gather())
    watching = asyncio.ensure_future(_until_disconnected(request))
    await asyncio.wait((collecting, watching), return_when=asyncio.FIRST_COMPLETED)
    watching.cancel()
    if not collecting.done():  # the client left: nobody reads this answer
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
        return Response(status_code=499)
    if collecting.exception() is not None:
        raise _api_error(collecting.exception())
    choices = [make_choice(finals[i], texts[i], logprobs[i]) for i in sorted(finals)]
    return {**meta, "choices": choices, "usage": _usage(ids, list(finals.values()))}


def _sse(outputs: AsyncIterator[RequestOutput], meta: dict, ids, include_usage: bool, make_choice):
    """Server-sent events: one chunk per delta, a usage chunk if asked, then ``[DONE]``. (Starlette cancels
    the stream when the client leaves, which aborts the request.)"""

    async def events() -> AsyncIterator[str]:
        finals: list[RequestOutput] = []
        try:
            async for out in outputs:
                if out.finished:
                    finals.append(out)
                yield _event({**meta, "choices": [make_choice(out)]})
        except Exception as error:  # the status line went out already: the error is the last event
            yield _event({"error": _api_error(error).body()})
            yield "data: [DONE]\n\n"
            return
        if include_usage:
            yield _event({**meta, "choices": [], "usage": _usage(ids, finals)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _completion_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob], offset: int) -> dict:
    """OpenAI's completions ``logprobs``: ``text_offset`` counts characters of the returned text (``offset``: where
    the first entry's token starts, after an echoed prompt and earlier chunks)."""
    tokens = [tokenizer.decode([e.token_id]) for e in entries]
    offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [_top_logprobs(tokenizer, e.top) for e in entries],
        "text_offset": offsets,
    }


def _top_logprobs(tokenizer: Tokenizer, top: list[tuple[int, float]]) -> dict[str, float]:
    """The alternatives keyed by their text, as OpenAI's completions API; two tokens of the same text (a special
    token and the empty string, two byte tokens of U+FFFD) keep both: the second is keyed by its vocabulary
    string, or ``token_id:N`` (vLLM's spelling)."""
    out: dict[str, float] = {}
    for token_id, logprob in top:
        key = tokenizer.decode([token_id])
        if key in out:
            key = tokenizer.id_to_token(token_id) or key
        if key in out:
            key = f"token_id:{token_id}"
        out[key] = logprob
    return out


def _chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> list[dict]:
    def item(token_id: int, logprob: float) -> dict:
        return {"token": tokenizer.decode([token_id]), "logprob": logprob,
                "bytes": list(token_bytes(tokenizer, token_id))}  # fmt: skip

    return [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]


# -- the server ------------------------------------------------------------------------------------------------


class _HeaderTimeout(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose first request head has not arrived within the
    header timeout (uvicorn times out idle keep-alive connections only after a response)."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        if self.scope is None and not self.transport.is_closing():  # no request head yet
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_timer.cancel()
        super().connection_lost(exc)


class _Once(logging.Filter):
    """Lets through the first of each kind of repeated error (``accept()`` failing at the open-files limit is
    logged by asyncio on every try, tens of MB a minute), then one line a minute saying how many were dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}
        self.dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = str(record.msg)[:60], time.monotonic()
        if now - self.last.get(key, -1e9) < 60:
            self.dropped[key] = self.dropped.get(key, 0) + 1
            return False
        self.last[key] = now
        dropped = self.dropped.pop(key, 0)
        if dropped:  # one line that says how many were dropped (their tracebacks are the first one's)
            record.msg, record.exc_info = f"{record.msg} (and {dropped} more like it in the last minute)", None
        return True


_ONCE = _Once()


def _raise_open_files_limit() -> int:
    """Raise the soft limit of open files to the hard one (as vLLM does); the limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


def http_server(app: FastAPI, sc: ServerConfig) -> uvicorn.Server:
    """uvicorn serving ``app`` with ``sc``'s limits: a header timeout, a cap on connections below the open-files
    limit (raised to its hard maximum), and asyncio's repeated errors logged once a minute."""
    files = _raise_open_files_limit()
    logging.getLogger("asyncio").addFilter(_ONCE)  # (added once: a logger keeps a filter once)
    protocol = type("HeaderTimeout", (_HeaderTimeout,), {"header_timeout": sc.header_timeout})
    return uvicorn.Server(uvicorn.Config(
        app, host=sc.host, port=sc.port, log_level="critical", http=protocol, timeout_keep_alive=5,
        limit_concurrency=sc.max_connections or max(files - 64, 16), backlog=min(2048, files),
        timeout_graceful_shutdown=max(sc.shutdown_timeout, 1.0)))  # fmt: skip


def serve(
    model_dir: str | Path,
    stop: threading.Event,
    server_config: ServerConfig | None = None,
    config: EngineConfig | None = None,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    tokenizer_path: str | None = None,
    log: Callable[[str], None] = print,
    dtype_text: str = "",
    auto_compile: bool = False,
    auto_speculative: bool = False,
) -> None:
    """``hyla serve``: load a model (or run) directory and serve it until ``stop`` is set (the CLI sets it on SIGINT and
    SIGTERM), then shut down gracefully: new requests get 503, running ones have ``shutdown_timeout`` seconds
    to finish, and those left end with an error (an error event and ``[DONE]`` when streamed). ``auto_compile``:
    ``config.compile`` is chosen here (:func:`~hyla.serve.runner.compile_choice`), and a failed compile falls back
    to the eager forward instead of stopping. ``auto_speculative``: ``config.speculative`` is chosen here, prompt
    lookup where the decode steps compile (where verify steps pay: RESULTS.md), none where they run eager."""
    from hyla.checkpoint import load_pretrained

    sc = server_config or ServerConfig()
    config = config or EngineConfig()
    loaded = load_pretrained(model_dir, dtype=dtype, device=device, tokenizer=tokenizer_path)
    if auto_compile:
        on, why = compile_choice(loaded.model)
        config = dataclasses.replace(config, compile=on)
        log(f"hyla: compile {'on' if on else 'off'} (the default: {why}; --no-compile/--compile to choose)")
    if auto_speculative:
        config = dataclasses.replace(config, speculative="ngram" if config.compile else None)
        log(
            f"hyla: speculative decoding {config.speculative or 'off'} (the default "
            f"{'with' if config.compile else 'without'} compiled decode steps; --speculative ngram/off to choose)"
        )
    if config.compile:
        log(f"hyla: compiling the decode steps of up to {COMPILED_MAX_BATCH} requests (cached on disk: a later "
            "start takes seconds to a minute)")  # fmt: skip
    try:
        llm_engine = LLMEngine(loaded.model, loaded.tokenizer, config)
    except ConfigError as error:
        if not (auto_compile and config.compile):
            raise
        speculative = None if auto_speculative else config.speculative
        log(f"hyla: {error}; serving the eager forward" + (", speculative decoding off" if auto_speculative else ""))
        config = dataclasses.replace(config, compile=False, speculative=speculative)
        llm_engine = LLMEngine(loaded.model, loaded.tokenizer, config)
    engine = AsyncEngine(llm_engine, sc.max_waiting, start_thread=False)
    if stop.is_set():  # a signal while the model loaded or compiled: nothing was served yet
        log("hyla: stopped before serving")
        return
    name = sc.served_model_name or Path(model_dir).resolve().name
    app = build_app(engine, name, sc.api_key, loaded.chat_template, sc.max_request_bytes)
    server = http_server(app, sc)
    thread = threading.Thread(target=server.run, name="hyla-http", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    if not server.started:
        raise ConfigError(
            f"could not serve on {sc.host}:{sc.port} (is the port taken, or the address not this machine's?)"
        )
    c = engine.engine.config
    log(
        f"hyla: serving {name!r} on http://{sc.host}:{sc.port}/v1 ({c.max_num_seqs} sequences, {c.num_blocks} KV "
        f"blocks of {c.block_size} tokens, context {c.max_model_len}, {c.max_num_batched_tokens} tokens per step"
        f"{'; ' + dtype_text if dtype_text else ''}"
        f"{f'; decode steps compiled in {engine.engine.runner.compile_seconds:.0f} s' if c.compile else ''}"
        f"{f'; speculative {c.speculative}, up to {c.num_draft_tokens} drafts' if c.speculative else ''})"
    )

    watchdog = threading.Thread(target=lambda: (thread.join(), stop.set()), name="hyla-http-watch", daemon=True)
    watchdog.start()  # the HTTP server dying on its own stops the engine loop too
    try:
        # The tensor work runs on the main thread (see hyla.serve.async_engine).
        finished, ended = engine.run(stop=stop, grace_s=sc.shutdown_timeout)
    finally:
        server.should_exit = True
        thread.join(timeout=sc.shutdown_timeout + 5)
    log(
        f"hyla: stopped; {finished} in-flight sequence(s) finished during the shutdown, {ended} ended at the "
        f"{sc.shutdown_timeout:g} s deadline"
    )
