"""Serving: a continuous-batching engine (scheduler, runner, pooled state slots and paged KV cache,
sampling) behind an offline API (:class:`LLM`) and an OpenAI-compatible HTTP server (``hyla.serve.api``);
``generate`` is the single-batch reference the engine is tested against."""

from hyla.serve.engine import LLM, EngineConfig, LLMEngine, RequestOutput
from hyla.serve.generate import generate
from hyla.serve.sampling import RequestError, SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestError", "RequestOutput", "SamplingParams", "generate"]
