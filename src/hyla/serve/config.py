"""The HTTP server's settings (``hyla serve``'s flags): a module of its own, so that the command line reads them
without importing the web server."""

from __future__ import annotations

from dataclasses import dataclass, field

from hyla.errors import check_fields

# Request bodies past this size are refused (413) before they are parsed.
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
# The environment variable `hyla serve` reads its API key from (an argument shows in the process list).
API_KEY_ENV = "HYLA_API_KEY"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ServerConfig:
    """The HTTP side of ``hyla serve`` (the engine's limits are :class:`~hyla.serve.engine.EngineConfig`); each
    field's ``help`` is its command-line flag's."""

    host: str = field(default="127.0.0.1", metadata=_help("address to listen on"))
    port: int = field(default=8000, metadata=_help("port to listen on"))
    api_key: str | None = field(default=None, metadata=_help(
        f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV} if set; the variable keeps the key "
        "out of the process list)"))  # fmt: skip
    served_model_name: str | None = field(default=None, metadata=_help("the model's name in the API (default: the "
                                                                       "directory's)"))  # fmt: skip
    max_waiting: int = field(default=256, metadata=_help(
        "sequences queued (prompts x n of waiting requests) beyond which new requests get 503; one request asking "
        "for more gets 400"))  # fmt: skip
    max_request_bytes: int = field(default=DEFAULT_MAX_REQUEST_BYTES, metadata=_help(
        "request bodies past this size get 413"))  # fmt: skip
    shutdown_timeout: float = field(default=5.0, metadata=_help(
        "on SIGINT/SIGTERM, seconds running requests get to finish"))  # fmt: skip
    header_timeout: float = field(
        default=10.0,
        metadata=_help(
            "seconds a new connection has to send its request's head before it is closed (idle and slow clients)"
        ),
    )
    max_connections: int | None = field(
        default=None,
        metadata=_help("open connections past which requests get 503 (default: the open-files limit less a reserve)"),
    )

    def __post_init__(self) -> None:
        check_fields(self, [
            ("port", 0 <= self.port <= 65535, "must be in 0..65535"),
            ("max_waiting", self.max_waiting >= 1, "must be >= 1"),
            ("max_request_bytes", self.max_request_bytes >= 1, "must be >= 1"),
            ("shutdown_timeout", self.shutdown_timeout >= 0, "must be >= 0"),
            ("header_timeout", self.header_timeout > 0, "must be > 0"),
            ("max_connections", self.max_connections is None or self.max_connections >= 1, "must be >= 1"),
        ])  # fmt: skip
