"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health, metrics.

Errors use OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``: 400 for an invalid parameter
(named in ``param``) or a prompt longer than the context, 401 for a missing or wrong API key (when the
server has one), 404 for an unknown model, 503 when the waiting queue is full.

Chat prompts come from the model directory's ``tokenizer_config.json`` ``chat_template`` (Jinja, as in
transformers) or, without one, :data:`DEFAULT_CHAT_TEMPLATE`: one ``role: content`` line per message, then
``assistant:``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jinja2
import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from hyla.serve.async_engine import AsyncEngine, EngineBusy
from hyla.serve.engine import EngineConfig, LLMEngine, RequestOutput, TokenLogprob
from hyla.serve.protocol import ChatCompletionRequest, CompletionRequest
from hyla.serve.sampling import RequestError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status)


def _internal_error(error: Exception) -> APIError:
    return APIError(500, f"internal error: {type(error).__name__}: {error}", "internal_error")


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None, chat_template: str | None = None):
    """The FastAPI app serving ``engine`` as model ``model_name``."""
    app = FastAPI(title="hyla", docs_url=None, redoc_url=None)
    template = jinja2.Environment(autoescape=False).from_string(chat_template or DEFAULT_CHAT_TEMPLATE)
    tokenizer = engine.engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestError)
    async def _bad_request(request: Request, error: RequestError) -> JSONResponse:
        return APIError(400, str(error), "invalid_request_error", error.param).response()

    @app.exception_handler(EngineBusy)
    async def _busy(request: Request, error: EngineBusy) -> JSONResponse:
        return APIError(503, str(error), "service_unavailable", code="server_busy").response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        return APIError(400, message, "invalid_request_error", param).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception) -> JSONResponse:
        return _internal_error(error).response()  # a last resort: engine failures are answered in the routes

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail), "invalid_request_error").response()

    async def authorize(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models() -> dict:
        e = engine.engine
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "hyla",
                "max_model_len": e.config.max_model_len, "vocab_size": e.vocab_size}  # fmt: skip
        return {"object": "list", "data": [card]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           "invalid_request_error", "model", "model_not_found")  # fmt: skip

    async def start(prompts: list[str | list[int]], params) -> tuple[list[list[int]], AsyncIterator[RequestOutput]]:
        """Encode and submit; errors before anything runs become 400 (RequestError), 503 (EngineBusy) or 500."""
        ids = [engine.engine.encode(p) for p in prompts]
        stream = engine.generate(ids, params)
        try:
            first = await anext(stream)
        except (RequestError, EngineBusy):
            raise
        except Exception as error:  # a failed engine step: this request fails, the server goes on
            raise _internal_error(error) from None

        async def chained() -> AsyncIterator[RequestOutput]:
            yield first
            async for out in stream:
                yield out

        return ids, chained()

    @v1.post("/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        params = body.sampling_params(body.max_tokens, body.logprobs)
        prompts = body.prompts()
        ids, outputs = await start(prompts, params)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}  # fmt: skip
        echoes = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts] if body.echo else None

        def choice(out: RequestOutput, text: str, entries: list[TokenLogprob], first: bool) -> dict:
            if echoes is not None and first:
                text = echoes[out.index // params.n] + text
            lp = _completion_logprobs(tokenizer, entries) if params.logprobs is not None else None
            return {"index": out.index, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}

        if body.stream:
            return _sse(outputs, meta, ids, params.n, body.include_usage,
                        lambda out: choice(out, out.text, out.logprobs, _first(out)))  # fmt: skip
        return await _collect(outputs, meta, ids, params.n, lambda out, text, lps: choice(out, text, lps, True))

    @v1.post("/chat/completions")
    async def chat(body: ChatCompletionRequest):
        check_model(body.model)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = body.logprobs_count()
        params = body.sampling_params(max_tokens, logprobs)
        if not body.messages:
            raise APIError(400, "messages must not be empty", "invalid_request_error", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = template.render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
        ids, outputs = await start([prompt], params)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name}  # fmt: skip

        def lp(entries: list[TokenLogprob]) -> dict | None:
            return {"content": _chat_logprobs(tokenizer, entries)} if logprobs is not None else None

        def delta(out: RequestOutput) -> dict:
            d = {"content": out.text}
            if _first(out):  # the first delta names the role
                d = {"role": "assistant", **d}
            return {"index": out.index, "delta": d, "logprobs": lp(out.logprobs), "finish_reason": out.finish_reason}

        if body.stream:
            return _sse(outputs, {**meta, "object": "chat.completion.chunk"}, ids, params.n, body.include_usage, delta)

        def message(out: RequestOutput, text: str, lps: list[TokenLogprob]) -> dict:
            return {"index": out.index, "message": {"role": "assistant", "content": text}, "logprobs": lp(lps),
                    "finish_reason": out.finish_reason}  # fmt: skip

        return await _collect(outputs, meta, ids, params.n, message)

    app.include_router(v1)
    return app


def _first(out: RequestOutput) -> bool:
    """Whether this is a sequence's first delta."""
    return out.num_output_tokens == len(out.token_ids)


def _usage(ids: list[list[int]], n: int, completion_tokens: int) -> dict:
    prompt_tokens = sum(len(p) for p in ids) * n
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


async def _collect(outputs: AsyncIterator[RequestOutput], meta: dict, ids, n: int, make_choice) -> dict:
    """A whole (non-streamed) response: each sequence's deltas joined into one choice."""
    texts: dict[int, str] = {}
    logprobs: dict[int, list[TokenLogprob]] = {}
    finals: dict[int, RequestOutput] = {}
    try:
        async for out in outputs:
            texts[out.index] = texts.get(out.index, "") + out.text
            logprobs.setdefault(out.index, []).extend(out.logprobs)
            if out.finished:
                finals[out.index] = out
    except Exception as error:
        raise _internal_error(error) from None
    choices = [make_choice(finals[i], texts[i], logprobs[i]) for i in sorted(finals)]
    completion_tokens = sum(out.num_output_tokens for out in finals.values())
    return {**meta, "choices": choices, "usage": _usage(ids, n, completion_tokens)}


def _sse(outputs: AsyncIterator[RequestOutput], meta: dict, ids, n: int, include_usage: bool, make_choice):
    """Server-sent events: one chunk per delta, a usage chunk if asked, then ``[DONE]``."""

    async def events() -> AsyncIterator[str]:
        completion_tokens = 0
        try:
            async for out in outputs:
                if out.finished:
                    completion_tokens += out.num_output_tokens
                yield _event({**meta, "choices": [make_choice(out)]})
        except Exception as error:  # the status line went out already: the error is the last event
            yield _event({"error": _internal_error(error).body()})
            yield "data: [DONE]\n\n"
            return
        if include_usage:
            yield _event({**meta, "choices": [], "usage": _usage(ids, n, completion_tokens)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _completion_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    return {
        "tokens": [tokenizer.decode([e.token_id]) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{tokenizer.decode([t]): lp for t, lp in e.top} for e in entries],
        "text_offset": [],
    }


def _chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> list[dict]:
    def item(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    config: EngineConfig | None = None,
    max_waiting: int = 256,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
) -> None:
    """``hyla serve``: load a model directory and serve it until interrupted."""
    import uvicorn

    from hyla.checkpoint import load
    from hyla.data.tokenizer import load_tokenizer

    model = load(model_dir, dtype=dtype, device=device)
    tokenizer = load_tokenizer(model_dir)
    settings = Path(model_dir) / "tokenizer_config.json"
    chat_template = json.loads(settings.read_text()).get("chat_template") if settings.is_file() else None
    engine = AsyncEngine(LLMEngine(model, tokenizer, config), max_waiting, start_thread=False)
    name = model_name or Path(model_dir).resolve().name
    app = build_app(engine, name, api_key, chat_template)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="hyla-http", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    if not server.started:
        raise ValueError(f"could not serve on {host}:{port} (is the port taken?)")
    c = engine.engine.config
    print(f"hyla: serving {name!r} on http://{host}:{port}/v1 ({c.max_num_seqs} sequences, {c.num_blocks} KV blocks "
          f"of {c.block_size} tokens, context {c.max_model_len}, {c.max_num_batched_tokens} tokens per step)",
          flush=True)  # fmt: skip
    try:
        engine.run(keep_going=thread.is_alive)  # the tensor work on the main thread (see hyla.serve.async_engine)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        thread.join(timeout=10)
