"""hyla's errors: one type per kind of mistake, each a ``ValueError`` whose message names the value and the fix.

The command line prints any :class:`HylaError` as one line (``hyla: error: ...``) and exits with status 2; the
HTTP server answers a :class:`RequestError` with 400 naming its parameter.
"""

from __future__ import annotations

from collections.abc import Iterable


class HylaError(ValueError):
    """A mistake in what hyla was given (not a bug in hyla). Raise the subclass at fault, never this one."""

    @classmethod
    def for_field(cls, name: str, message: str) -> HylaError:
        """The error for field ``name`` breaking a rule: ``"{name} {message}"`` (:class:`RequestError` keeps the
        name apart, as the parameter the HTTP API reports)."""
        return cls(f"{name} {message}")


class ConfigError(HylaError):
    """A configuration that cannot work: a model shape, a training run's settings, a device or dtype."""


class DataError(HylaError):
    """Data that cannot be used: a corpus, a tokenizer file, a run directory's contents."""


class CheckpointError(HylaError):
    """A model directory that cannot be loaded; the message says what is wrong and where."""


class RequestError(HylaError):
    """An invalid request: ``param`` names the parameter at fault (the HTTP API answers 400 with it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param

    @classmethod
    def for_field(cls, name: str, message: str) -> RequestError:
        return cls(name, message)


def check_fields(obj: object, rules: Iterable[tuple[str, bool, str]], error: type[HylaError] = ConfigError) -> None:
    """The one validation style: ``rules`` are ``(field, ok, rule)``; the first that fails raises ``error``
    naming the field, the rule and the value given (``"top_p must be in (0, 1], got 0"``)."""
    for name, ok, rule in rules:
        if not ok:
            raise error.for_field(name, f"{rule}, got {getattr(obj, name)!r}")
