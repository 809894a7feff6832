"""The error contract: a user's mistake raises the HylaError subclass at fault (one line, exit 2); anything else
is a bug and keeps its traceback. Checked over every ``raise`` in hyla's source."""

import ast
from pathlib import Path

import pytest

from hyla.errors import ConfigError, RequestError, check_fields

SRC = Path(__file__).resolve().parents[1] / "src" / "hyla"
# Where a builtin ValueError/TypeError means a programmer's misuse of a function (a wrong shape, an impossible
# argument), never something a command-line or HTTP user can cause: the tensor code below the engines.
PROGRAMMER_ERRORS_ALLOWED = ("ops/", "model/", "serve/runner.py")


def raises() -> list[tuple[str, int, str]]:
    """Every ``raise Name(...)`` in hyla: (file, line, Name)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                found.append((str(path.relative_to(SRC)), node.lineno, node.exc.func.id))
    return found


def test_no_bare_hyla_error_and_no_builtin_errors_where_users_reach():
    found = raises()
    assert len(found) > 100  # the walk sees the source
    bare = [f"{f}:{n}" for f, n, name in found if name == "HylaError"]
    assert not bare, f"raise the HylaError subclass at fault, not HylaError itself: {bare}"
    builtin = [f"{f}:{n} {name}" for f, n, name in found if name in ("ValueError", "TypeError", "KeyError")
               and not f.startswith(PROGRAMMER_ERRORS_ALLOWED)]  # fmt: skip
    assert not builtin, f"a user's mistake is a HylaError subclass (ConfigError, DataError, ...): {builtin}"


def test_the_command_line_catches_hyla_errors_only():
    """An internal bug (a plain ValueError) keeps its traceback instead of printing as the user's mistake."""
    from hyla import cli

    handlers = [h for node in ast.walk(ast.parse(Path(cli.__file__).read_text())) if isinstance(node, ast.Try)
                for h in node.handlers]  # fmt: skip
    caught = {ast.unparse(h.type) for h in handlers if h.type is not None}
    assert caught == {"HylaError", "KeyboardInterrupt"}


def test_check_fields_asks_the_error_class_how_to_name_a_field():
    class Box:
        top_p = 0

    with pytest.raises(ConfigError, match=r"^top_p must be in \(0, 1\], got 0$"):
        check_fields(Box(), [("top_p", False, "must be in (0, 1]")])
    with pytest.raises(RequestError) as e:
        check_fields(Box(), [("top_p", False, "must be in (0, 1]")], RequestError)
    assert e.value.param == "top_p" and str(e.value) == "top_p: must be in (0, 1], got 0"
