"""Serving: generation on the model's caches (the continuous-batching engine and HTTP API build on it)."""

from hyla.serve.generate import generate

__all__ = ["generate"]
