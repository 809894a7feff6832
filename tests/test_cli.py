"""The ``hyla`` command, run as a user runs it."""

import subprocess
import sys

import hyla


def run(*args):
    return subprocess.run([sys.executable, "-m", "hyla", *args], capture_output=True, text=True, timeout=300)


def test_generate_from_a_preset():
    out = run("generate", "--preset", "tiny", "--prompt", "def f(x):", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def f(x):")
    assert "generated 8 tokens" in out.stderr


def test_generate_from_a_directory(tmp_path):
    hyla.HylaForCausalLM(hyla.preset("tiny")).save_pretrained(tmp_path)
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
