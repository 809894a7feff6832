"""The README's own "Use" examples, run as written: the Python snippet, and every command of its command list
(``runs/default`` is a small trained run; ``hyla serve`` is started and stopped; commands that run for minutes
have their arguments parsed). A command the README gains that this file does not know fails the test."""

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from hyla.bench.serve import free_port
from hyla.cli import build_parser
from tests.helpers import TRAIN

README = Path(__file__).resolve().parents[1] / "README.md"


def use_section() -> str:
    text = README.read_text()
    return text[text.index("## Use") :]


def python_snippet() -> str:
    return re.search(r"```python\n(.*?)```", use_section(), re.S)[1]


def commands() -> list[list[str]]:
    block = re.search(r"```bash\n(.*?)```", use_section(), re.S)[1]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def hyla(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hyla", *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A working directory holding what the README's commands expect: `runs/default` (a tiny trained run) and
    `my-model` (written by the README's Python snippet)."""
    from tests.helpers import small_corpus

    cwd = tmp_path_factory.mktemp("readme")
    small_corpus(cwd / "corpus", n=20)
    out = hyla("train", "--run-dir", "runs/default", "--data", "corpus", "--steps", "3", "--cache-dir", "cache",
               *TRAIN, cwd=cwd)  # fmt: skip
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-c", python_snippet()], cwd=cwd, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return cwd


@pytest.mark.slow
def test_the_python_snippet_writes_a_model_directory_that_serves(home):
    assert {p.name for p in (home / "my-model").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}


def serve_until_healthy(argv: list[str], cwd: Path) -> str:
    port = str(free_port())
    argv = [port if previous == "--port" else a for previous, a in zip(["", *argv[:-1]], argv, strict=True)]
    server = subprocess.Popen([sys.executable, "-m", "hyla", *argv], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
            time.sleep(0.3)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        return server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# Commands that run for minutes (the main job, a benchmark, a sweep): the README's arguments are parsed.
PARSED = {("train",), ("bench", "context"), ("bench", "serve"), ("sweep",)}


@pytest.mark.slow
@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv[1:3]))
def test_every_readme_command_runs_as_written(home, argv):
    assert argv[0] == "hyla"
    args = argv[1:]
    if args[0] == "COMMAND":  # the placeholder line: hyla COMMAND --help
        assert hyla(args[-1], cwd=home).returncode == 0
        return
    if tuple(args[:1]) in PARSED or tuple(args[:2]) in PARSED:
        build_parser().parse_args(args)
        return
    if args[0] == "serve":
        out = serve_until_healthy(args, home)
        assert "hyla: serving" in out
        assert "hyla: compile on (the default: C++ compiler" in out and "decode steps compiled in" in out
        assert "hyla: speculative decoding ngram (the default with compiled" in out
        assert "speculative ngram, up to 32 drafts" in out
        return
    assert args[0] in ("generate", "chat", "export", "eval"), f"a README command this test does not know: {argv}"
    out = hyla(*args, cwd=home, stdin="def f(x):\n/quit\n" if args[0] == "chat" else None)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    if args[0] == "export":
        assert (home / "runs" / "default" / "default-q8_0.gguf").is_file()  # where the README's comment says
