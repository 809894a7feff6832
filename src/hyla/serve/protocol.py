"""OpenAI request bodies (completions and chat completions) and their mapping to :class:`SamplingParams`.

Fields beyond OpenAI's are vLLM's extensions with vLLM's names: ``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``. Unknown fields are ignored; known
OpenAI fields this server cannot honour (tools, structured output, ``suffix``, ``best_of`` other than ``n``) are
refused with 400 naming them, never silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from hyla.serve.sampling import RequestError, SamplingParams

# Prompts in one completions request at most (OpenAI's limit).
MAX_PROMPTS = 2048


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    logit_bias: dict[str, float] | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options", "is only allowed with stream=true")
        self.refuse_unsupported()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise RequestError("logit_bias", f"keys must be token ids, got {key!r}")
            bias[int(key)] = value
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            n=self.n,
            logprobs=logprobs,
            logit_bias=bias,
        )

    def refuse_unsupported(self) -> None:
        """400 for fields this server would otherwise ignore (each request type adds its own)."""

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        if self.suffix:
            raise RequestError("suffix", "is not supported (no fill-in-the-middle)")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of", f"is not supported other than equal to n ({self.n})")

    def prompts(self) -> list[str | list[int]]:
        """One or several prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str) or not p or isinstance(p[0], int):  # (an empty one is refused when encoded)
            return [p]
        if len(p) > MAX_PROMPTS:
            raise RequestError("prompt", f"at most {MAX_PROMPTS} prompts in one request (as OpenAI), got {len(p):,}")
        return list(p)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None

    def refuse_unsupported(self) -> None:
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise RequestError("response_format", f"type {kind!r} is not supported (no guided decoding); use 'text'")
        if self.tools or self.functions:
            raise RequestError("tools" if self.tools else "functions", "tool calling is not supported by this server")
        if self.tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice", f"{self.tool_choice!r} needs tool calling, which this server lacks")

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs", "needs logprobs=true")
        return (self.top_logprobs or 0) if self.logprobs else None
