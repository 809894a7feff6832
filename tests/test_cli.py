"""The ``hyla`` command, run as a user runs it."""

import json
import signal
import subprocess
import sys
import time

import pytest

import hyla
from hyla.data.tokenizer import byte_level_tokenizer


def run(*args):
    return subprocess.run([sys.executable, "-m", "hyla", *args], capture_output=True, text=True, timeout=300)


def test_generate_from_a_preset():
    out = run("generate", "--preset", "tiny", "--prompt", "def f(x):", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def f(x):")
    assert "generated 8 tokens" in out.stderr


def model_dir(path):
    """A model directory as `hyla train` leaves one: weights, config and the tokenizer."""
    hyla.HylaForCausalLM(hyla.preset("tiny")).save_pretrained(path)
    byte_level_tokenizer().save(str(path / "tokenizer.json"))
    return path


def test_generate_from_a_directory(tmp_path):
    model_dir(tmp_path)
    out = run("generate", str(tmp_path), "--max-new-tokens", "3", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert "generated 3 tokens" in out.stderr


def test_bad_directory_is_one_clear_line(tmp_path):
    out = run("generate", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        == f"hyla: error: model directory '{tmp_path / 'missing'}' does not exist or is not a directory"
    )
    assert "Traceback" not in out.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_answers_the_openai_client(tmp_path):
    """``hyla serve DIR`` as a user starts it: a real process, a real port, the official client."""
    import openai

    model_dir(tmp_path / "model")
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "hyla",
        "serve",
        str(tmp_path / "model"),
        "--port",
        str(port),
        "--max-model-len",
        "512",
        "--shutdown-timeout",
        "0",
    ]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
                time.sleep(0.2)
        assert [m.id for m in models.data] == ["model"]
        out = client.completions.create(model="model", prompt="def f(x):", max_tokens=5, temperature=0,
                                        extra_body={"ignore_eos": True})  # fmt: skip
        assert out.usage.completion_tokens == 5
        chat = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2)  # fmt: skip
        assert chat.usage.prompt_tokens == len("<user>hi<assistant>")  # the directory's template, byte tokens
        # SIGTERM mid-stream, no grace period: the stream ends with an error event and [DONE], the process with 0.
        stream = client.completions.create(model="model", prompt="x", max_tokens=500, stream=True,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        next(iter(stream))
        server.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shut down"):
            for _ in stream:
                pass
        assert server.wait(timeout=30) == 0
        log = server.stdout.read()
        assert "SIGTERM: shutting down" in log and "1 ended at the 0 s deadline" in log and "Traceback" not in log
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_serve_a_missing_directory_is_one_clear_line(tmp_path):
    out = run("serve", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert out.stderr.startswith("hyla: error:") and len(out.stderr.strip().splitlines()) == 1


def test_serve_without_a_tokenizer_names_the_file(tmp_path):
    hyla.HylaForCausalLM(hyla.preset("tiny")).save_pretrained(tmp_path)
    out = run("serve", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{tmp_path / 'tokenizer.json'} is missing" in out.stderr and "--tokenizer" in out.stderr


def test_serve_a_bad_port_is_one_clear_line(tmp_path):
    out = run("serve", str(model_dir(tmp_path)), "--port", "99999")
    assert out.returncode == 2 and out.stderr.strip() == "hyla: error: --port must be in 0..65535, got 99999"
