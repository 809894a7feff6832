"""The ``hyla`` command, run as a user runs it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import hyla
from hyla.bench.serve import free_port
from hyla.data.tokenizer import byte_level_tokenizer
from tests.helpers import small_corpus, train_args


def run(*args):
    return subprocess.run([sys.executable, "-m", "hyla", *args], capture_output=True, text=True, timeout=300)


def test_generate_from_a_preset():
    out = run("generate", "--preset", "tiny", "--prompt", "def f(x):", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def f(x):")
    assert "generated 8 tokens" in out.stderr


def model_dir(path):
    """A model directory as `hyla train` leaves one: weights, config and the tokenizer."""
    hyla.save_pretrained(hyla.HylaForCausalLM(hyla.preset("tiny")), path)
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
        "--no-compile",  # the default (compiled) start is the README test's
    ]
    env = {**os.environ, "HYLA_API_KEY": "sk-env"}
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert "sk-env" not in " ".join(cmd)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-env", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
                time.sleep(0.2)
        assert [m.id for m in models.data] == ["model"]
        with pytest.raises(openai.AuthenticationError):  # the key came from $HYLA_API_KEY, not the command line
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
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
    hyla.save_pretrained(hyla.HylaForCausalLM(hyla.preset("tiny")), tmp_path)
    out = run("serve", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{tmp_path / 'tokenizer.json'} is missing" in out.stderr and "--tokenizer" in out.stderr


def test_serve_a_bad_port_is_one_clear_line(tmp_path):
    out = run("serve", str(model_dir(tmp_path)), "--port", "99999")
    assert out.returncode == 2 and out.stderr.strip() == "hyla: error: port must be in 0..65535, got 99999"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run, as `hyla train` leaves it, and what it printed."""

    tmp_path = tmp_path_factory.mktemp("cli")
    small_corpus(tmp_path / "corpus", n=20)
    out = run(*train_args(tmp_path, "r", 6))
    assert out.returncode == 0, out.stderr
    return tmp_path, out


def test_train_plans_then_summarises_in_words(trained):
    tmp_path, out = trained
    run_dir = tmp_path / "r"
    assert out.stdout.startswith(f"hyla train: a new run in {run_dir}: preset 'tiny'")
    assert "training a 300-id byte-level BPE tokenizer on 20 files" in out.stdout
    assert "tokenizer trained in" in out.stdout
    assert "expected: ~" in out.stdout and "more minutes for 1 steps" in out.stdout
    assert "x the unigram entropy" in out.stdout and "held-out tokens" in out.stdout
    assert f"model: {run_dir / 'checkpoint' / 'model'}" in out.stdout
    assert f"hyla generate {run_dir}" in out.stdout and f"hyla chat {run_dir}" in out.stdout
    assert not out.stdout.rstrip().endswith("}")  # no raw JSON line


def test_train_refuses_to_touch_an_existing_run(trained):
    tmp_path, _ = trained
    saved = (tmp_path / "r" / "train.json").read_bytes()
    metrics = (tmp_path / "r" / "metrics.jsonl").read_bytes()
    out = run(*train_args(tmp_path, "r", 6), "--set", "hidden_size=101")  # a config that cannot work
    assert out.returncode == 2 and "num_attention_heads (4) must divide hidden_size (101)" in out.stderr
    out = run(*train_args(tmp_path, "r", 6))  # a config that works, but the directory holds a run
    assert out.returncode == 2 and "already holds a run" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "r" / "train.json").read_bytes() == saved
    assert (tmp_path / "r" / "metrics.jsonl").read_bytes() == metrics
    out = run(*train_args(tmp_path, "r", 6), "--resume")
    assert out.returncode == 0 and "already finished its 6 steps: nothing to do" in out.stdout
    assert "--resume --steps 12" in out.stdout


def test_generate_and_serve_find_the_model_of_a_run_directory(trained):
    tmp_path, _ = trained
    out = run("generate", str(tmp_path / "r"), "--max-new-tokens", "3", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert f"# {tmp_path / 'r' / 'checkpoint' / 'model'}:" in out.stderr and "generated 3 tokens" in out.stderr
    out = run("generate", str(tmp_path / "corpus"))
    assert out.returncode == 2 and "is not a model directory: it has no config.json" in out.stderr


def test_chat_reads_turns_from_a_pipe(trained):
    """Completion mode (the demo-like model has no chat template): the second turn continues the first; /reset
    forgets it, so the third turn (the same text as the first) gets the first turn's reply."""
    tmp_path, _ = trained
    turns = "def add(a, b):\nreturn\n/reset\ndef add(a, b):\n/quit\nnever read\n"
    cmd = [sys.executable, "-m", "hyla", "chat", str(tmp_path / "r"), "--temperature", "0", "--max-tokens", "6"]
    out = subprocess.run(cmd, input=turns, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "completion" in out.stderr and "/reset" in out.stderr
    replies = out.stdout.split("(history cleared)\n")
    assert len(replies) == 2
    assert replies[0].startswith("> def add(a, b):\n") and replies[1].startswith("> def add(a, b):\n")  # echoed
    assert "> return\n" in replies[0] and replies[0].rstrip().endswith("> /reset")
    first, second = replies[0].split("\n")[1], replies[1].split("\n")[1]
    assert first == second and first  # the same prompt after /reset: the same greedy reply


def test_every_command_and_option_has_help():
    from hyla.cli import build_parser

    parser = build_parser()

    def check(p, name):
        assert p.description, name
        for action in p._actions:
            if action.dest == "help":
                continue
            sub = getattr(action, "choices", None)
            if isinstance(sub, dict):
                for child_name, child in sub.items():
                    check(child, f"{name} {child_name}")
            else:
                assert action.help and action.help.strip(), f"{name}: {action.option_strings or action.dest}"

    check(parser, "hyla")
    out = run("train", "--help")
    assert out.returncode == 0 and "A run directory is never replaced by accident" in out.stdout


def _interrupt(cmd: list[str], metrics, lines: int) -> tuple[int, str, str]:
    """Run ``cmd``, send SIGINT once ``metrics`` has ``lines`` lines; its exit code, stdout and stderr."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().count("\n") >= lines):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout, stderr


def test_train_interrupted_says_how_to_resume_and_that_command_resumes(tmp_path):
    """Ctrl-C (SIGINT) while training: the step ends, a checkpoint is saved, the message says how to resume; the
    command printed, run as printed, continues the same run (its steps and cadence come from train.json)."""
    import shlex

    small_corpus(tmp_path / "corpus", n=20)
    metrics = tmp_path / "r" / "metrics.jsonl"
    cmd = [sys.executable, "-m", "hyla", *train_args(tmp_path, "r", 100_000), "--checkpoint-every", "15"]
    code, stdout, stderr = _interrupt(cmd, metrics, 2)
    assert code == 130, stderr
    assert "SIGINT: stopping after this step" in stderr and "Traceback" not in stderr
    step = len(metrics.read_text().splitlines())
    printed = stdout.strip().splitlines()[-1]
    assert printed == f"interrupted at step {step}; checkpoint saved; resume with: hyla train --run-dir " \
        f"{shlex.quote(str(tmp_path / 'r'))} --resume"  # fmt: skip
    resume = shlex.split(printed.split("resume with: ")[1])
    assert resume[0] == "hyla"
    code, stdout, stderr = _interrupt([sys.executable, "-m", *resume], metrics, step + 2)
    assert code == 130, stderr
    assert f"resuming at step {step} in {tmp_path / 'r'}" in stdout and "100000 steps" in stdout
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # each step once, in order
    out = run(*train_args(tmp_path, "r", steps[-1] + 2), "--resume")  # flags that may change: the steps
    assert out.returncode == 0, out.stderr
    assert f"resuming at step {steps[-1]}" in out.stdout and len(metrics.read_text().splitlines()) == steps[-1] + 2
    out = run("train", "--run-dir", str(tmp_path / "r"), "--resume", "--lr", "0.5")
    assert out.returncode == 2 and "other values of ['lr']" in out.stderr


def test_dtype_auto_says_what_it_chose_and_why():
    out = run("generate", "--preset", "tiny", "--max-new-tokens", "2")
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stderr.splitlines() if "dtype auto: " in line)
    chosen = line.split("dtype auto: ")[1].split(",")[0]
    assert chosen in ("float32", "bfloat16") and " has " in line


def test_export_writes_a_gguf_of_a_run_and_keeps_an_existing_one(trained):
    import gguf

    tmp_path, _ = trained
    out = run("export", str(tmp_path / "r"), "--outtype", "q8_0")
    assert out.returncode == 0, out.stderr
    path = tmp_path / "r" / "r-q8_0.gguf"
    assert f"wrote {path}" in out.stdout and "llama-server -m" in out.stdout
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "minimax-01"
    vocab = json.loads((tmp_path / "r" / "checkpoint" / "model" / "config.json").read_text())["vocab_size"]
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == vocab == 300
    before = path.read_bytes()
    out = run("export", str(tmp_path / "r"), "--outtype", "q8_0")
    assert out.returncode == 2 and out.stderr.strip() == f"hyla: error: {path} exists; pass --overwrite to replace it"
    assert path.read_bytes() == before
    out = run("export", str(tmp_path / "corpus"))
    assert out.returncode == 2 and "is not a model directory" in out.stderr and "Traceback" not in out.stderr


def test_eval_prints_a_table_and_writes_json_and_png(trained):
    tmp_path, _ = trained
    out = run("eval", "mqar", str(tmp_path / "r"), "--lengths", "24", "48", "--pairs", "2", "4", "--contexts", "2",
              "--queries", "2", "--out", str(tmp_path / "ev"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "| length \\ pairs | 2 | 4 |" in out.stdout and "| 48 |" in out.stdout
    result = json.loads((tmp_path / "ev" / "mqar.json").read_text())
    assert result["trials"] == [[4, 4], [4, 4]] and (tmp_path / "ev" / "mqar.png").is_file()
    out = run("eval", "loss", str(tmp_path / "r"), "--data", str(tmp_path / "corpus"), "--context", "64",
              "--out", str(tmp_path / "ev"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "| positions | mean loss (nats) | tokens |" in out.stdout and "held-out" in out.stdout
    out = run("eval", "passkey", str(tmp_path / "r"), "--lengths", "100000")
    assert out.returncode == 2 and "do not fit the context" in out.stderr and "Traceback" not in out.stderr
    out = run("eval", "mqar", str(tmp_path / "corpus"))
    assert out.returncode == 2 and "is not a model directory" in out.stderr


def test_chat_renders_the_template_in_a_sandbox(tmp_path):
    marker = tmp_path / "pwned"
    model_dir(tmp_path / "model")
    exploit = f"{{{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}}}"
    config = tmp_path / "model" / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": exploit}))
    out = subprocess.run([sys.executable, "-m", "hyla", "chat", str(tmp_path / "model"), "--max-tokens", "2"],
                         input="hello\n", capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "the chat template refused this turn" in out.stdout and not marker.exists()
    config.write_text(json.dumps({"chat_template": "{% if %}"}))
    out = run("chat", str(tmp_path / "model"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"hyla: error: the chat_template of {tmp_path / 'model'} is not a valid Jinja")


def test_a_mistyped_flag_shows_the_subcommands_usage_and_the_closest_flag():
    out = run("generate", "some-dir", "--temprature", "0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("usage: hyla generate") and "--temprature -> --temperature" in out.stderr
    out = run("bench", "serve", "--concurency", "4")
    assert out.stderr.startswith("usage: hyla bench serve") and "--concurency -> --concurrency" in out.stderr


def test_llm_takes_a_run_directory_and_a_dtype_by_name(trained):
    from hyla.errors import ConfigError
    from hyla.serve import LLM, SamplingParams

    tmp_path, _ = trained
    llm = LLM(tmp_path / "r", dtype="float64")
    (out,) = llm.generate(["def "], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 3 and next(llm.engine.model.parameters()).dtype == torch.float64
    with pytest.raises(ConfigError, match="dtype must be one of"):
        LLM(tmp_path / "r", dtype="float16x")
