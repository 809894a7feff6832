"""hyla's errors: one type per kind of mistake, each a ``ValueError`` whose message names the value and the fix.

The command line prints any :class:`HylaError` as one line (``hyla: error: ...``) and exits with status 2; the
HTTP server answers a :class:`RequestError` with 400 naming its parameter.
"""

from __future__ import annotations

from collections.abc import Iterable


class HylaError(ValueError):
    """A mistake in what hyla was given (not a bug in hyla)."""


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


def check_fields(obj: object, rules: Iterable[tuple[str, bool, str]], error: type[HylaError] = ConfigError) -> None:
    """The one validation style: ``rules`` are ``(field, ok, rule)``; the first that fails raises ``error``
    naming the field, the rule and the value given (``"top_p must be in (0, 1], got 0"``)."""
    for name, ok, rule in rules:
        if not ok:
            value = getattr(obj, name)
            if error is RequestError:
                raise RequestError(name, f"{rule}, got {value!r}")
            raise error(f"{name} {rule}, got {value!r}")
