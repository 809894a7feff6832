"""Serving: a continuous-batching engine (scheduler, runner, pooled state slots and paged KV cache,
sampling) behind an offline API (:class:`LLM`) and an OpenAI-compatible HTTP server (``hyla.serve.api``).
The tests check it against a full forward over the whole sequence for every token."""

from hyla.errors import RequestError
from hyla.serve.engine import EngineConfig, LLMEngine
from hyla.serve.llm import LLM
from hyla.serve.outputs import RequestOutput
from hyla.serve.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestError", "RequestOutput", "SamplingParams"]
