"""Speculative decoding (prompt lookup) for one user: decode tokens/s with it off and on, on trained weights.

Two workloads, one request at a time (``max_num_seqs=1``, as ``hyla generate`` and ``hyla chat`` run), greedy:
``code`` continues a prefix of a file of the Python standard library (text that copies from its context), and
``random`` continues random token ids (nothing to copy: speculation must not cost there). The two engines, each
with its own copy of the model, alternate prompt by prompt; each pair's outputs are checked to be equal (greedy:
speculation is exact). Decode speed is the tokens after the first over the time after the first (the prefill
excluded); the acceptance rate is the engine's drafted tokens accepted. ``--quantize int8`` runs both hyla engines
with int8 linear layers and experts (and llama-server on q8_0); there the verify step's several-row int8 products
may round a logit differently from the one-row products of a plain step, so a greedy tie can break the other way:
outputs are counted, not required equal (float32 stops at the first difference: a bug there).

With ``--llama-bin DIR`` (llama.cpp's ``bin`` folder, see ``llamacpp.py``) llama-server joins the alternation on
the same model (exported to GGUF f32, q8_0 with ``--quantize int8``) and the same token ids: ``-np 1``, all
cores, once without speculation and once per ``--llama-spec`` type (its own prompt-lookup drafts:
``ngram-simple``, ``ngram-mod``, ... at their default sizes: this build's ``--spec-draft-n-max`` is the draft
model's, and ``ngram-mod`` drafts 48-64 tokens after a 24-token match, the setting its documentation recommends);
its decode speed is
the server's own ``timings.predicted_per_second`` (the prefill excluded, as ours) and its acceptance
``draft_n_accepted / draft_n``; its greedy tokens are compared with hyla's.

    python benchmarks/speculative.py --model runs/default [--compile] [--quantize int8]
        [--llama-bin DIR --llama-spec ngram-simple ngram-mod]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import statistics
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch
from llamacpp import soname_links, start_llama_server_or_no_repack

from hyla.bench import append_result, machine_description
from hyla.checkpoint import load_pretrained
from hyla.interop.gguf import export_gguf
from hyla.runtime import tune_malloc
from hyla.serve import LLM, EngineConfig, SamplingParams

RESULTS = Path(__file__).parent / "RESULTS.md"


def code_prompts(count: int, chars: int, seed: int) -> list[str]:
    """Prefixes of ``chars`` characters of ``count`` standard-library files (seeded choice), each cut at a line."""
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 4 * chars)
    rng = random.Random(seed)
    prompts = []
    for path in rng.sample(files, count):
        text = path.read_text(errors="replace")
        start = rng.randrange(0, len(text) - 2 * chars)
        start = text.find("\n", start) + 1
        prompts.append(text[start : text.rfind("\n", start, start + chars) + 1])
    return prompts


def decode_speed(llm: LLM, prompt: str | list[int], max_tokens: int) -> tuple[float, list[int]]:
    """Tokens/s after the first output, and the output tokens."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    first, first_count, tokens = None, 0, []
    for out in llm.stream([prompt], params):
        tokens += out.token_ids
        if first is None:
            first, first_count = time.perf_counter(), len(tokens)
    return (len(tokens) - first_count) / (time.perf_counter() - first), tokens


class LlamaSide:
    """One llama-server (``-np 1``) with the given extra flags, decoding token-id prompts greedily."""

    def __init__(self, url: str) -> None:
        self.url = url.removesuffix("/v1")
        self.drafted = self.accepted = 0

    def decode(self, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
        body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "samplers": ["top_k"], "top_k": 1,
                "return_tokens": True, "cache_prompt": False, "ignore_eos": True}  # fmt: skip
        request = urllib.request.Request(f"{self.url}/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=600) as response:
            out = json.loads(response.read())
        timings = out["timings"]
        self.drafted += timings.get("draft_n", 0)
        self.accepted += timings.get("draft_n_accepted", 0)
        return timings["predicted_per_second"], out["tokens"]


@contextlib.contextmanager
def llama_sides(
    bin_dir: Path, loaded, context: int, specs: list[str], outtype: str
) -> Iterator[tuple[dict[str, LlamaSide], tuple[str, ...]]]:
    """llama-server once without speculation and once per spec type, on ``loaded``'s model as GGUF ``outtype``;
    yields the sides and the flags they all run with (``--no-repack`` where repacking crashed at load)."""
    servers = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"model-{outtype}.gguf"
        export_gguf(loaded.model, loaded.tokenizer, path, outtype)
        libraries = soname_links(bin_dir, Path(tmp) / "lib")
        sides = {}
        try:
            repack: tuple[str, ...] = ()
            for spec in ["none", *specs]:
                flags = (*repack, *(() if spec == "none" else ("--spec-type", spec)))
                server, url, used = start_llama_server_or_no_repack(bin_dir, libraries, path, 1, context, flags)
                servers.append(server)
                if used != flags:
                    repack = ("--no-repack",)
                    print(f"{outtype}: llama-server crashed at load, so it runs with --no-repack", flush=True)
                sides[f"llama.cpp {'off' if spec == 'none' else spec}"] = LlamaSide(url)
            yield sides, repack
        finally:
            for server in servers:
                server.send_signal(signal.SIGTERM)
            for server in servers:
                server.wait(timeout=60)


def decode(side: LLM | LlamaSide, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    return side.decode(prompt, max_tokens) if isinstance(side, LlamaSide) else decode_speed(side, prompt, max_tokens)


def drafts(side: LLM | LlamaSide) -> tuple[int, int]:
    """Drafted and accepted tokens so far."""
    if isinstance(side, LlamaSide):
        return side.drafted, side.accepted
    return side.engine.stats.draft_tokens, side.engine.stats.accepted_tokens


def table_rows(
    sides: dict[str, LLM | LlamaSide], workloads: dict[str, list[list[int]]], max_tokens: int, exact: bool
) -> list[str]:
    """Every side on every prompt, alternating prompt by prompt: one row per workload and side. ``exact``: hyla's
    outputs with speculation must equal its outputs without (stop at the first that does not)."""
    for side in sides.values():  # warm up each side once
        decode(side, workloads["code"][0], 8)
    rows = ["| workload | side | decode tok/s | accepted drafts | vs hyla off | vs llama.cpp off | greedy tokens "
            "equal to hyla's |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for workload, prompts in workloads.items():
        speeds: dict[str, list[float]] = {name: [] for name in sides}
        equal = dict.fromkeys(sides, 0)
        before = {name: drafts(side) for name, side in sides.items()}
        for prompt in prompts:
            outputs = {}
            for name, side in sides.items():
                speed, outputs[name] = decode(side, prompt, max_tokens)
                speeds[name].append(speed)
                equal[name] += outputs[name] == outputs["hyla off"]
            if exact and any(out != outputs["hyla off"] for name, out in outputs.items() if name.startswith("hyla")):
                raise SystemExit(f"speculation changed a greedy output on {workload}: a bug")
        medians = {name: statistics.median(v) for name, v in speeds.items()}
        for name, side in sides.items():
            drafted, accepted = (b - a for a, b in zip(before[name], drafts(side), strict=True))
            rate = f"{accepted / drafted:.2f} of {drafted:,}" if drafted else "none"
            versus = f"{medians[name] / medians['llama.cpp off']:.2f}x" if "llama.cpp off" in medians else "-"
            ours = f"{medians[name] / medians['hyla off']:.2f}x"
            rows.append(f"| {workload} | {name} | {medians[name]:.1f} | {rate} | {ours} | {versus} "
                        f"| {equal[name]} of {len(prompts)} |")  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained model or run directory")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per workload")
    parser.add_argument("--chars", type=int, default=1500, help="characters of each code prompt")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-draft-tokens", type=int, nargs="+", default=[32])
    parser.add_argument("--compile", action="store_true", help="both engines with --compile")
    parser.add_argument("--quantize", choices=["int8"], default=None, help="hyla int8, llama.cpp q8_0")
    parser.add_argument("--llama-bin", type=Path, help="llama.cpp's bin folder: llama-server joins (see above)")
    parser.add_argument("--llama-spec", nargs="*", default=["ngram-simple", "ngram-mod"],
                        help="llama-server's --spec-type values to run besides none")  # fmt: skip
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    tune_malloc()
    torch.manual_seed(0)

    def engine(**spec) -> LLM:
        loaded = load_pretrained(args.model)
        context = min(loaded.model.config.max_position_embeddings, 4096)
        config = EngineConfig(max_num_seqs=1, max_model_len=context, compile=args.compile, quantize=args.quantize,
                              **spec)  # fmt: skip
        return LLM(loaded.model, loaded.tokenizer, config)

    sides: dict[str, LLM | LlamaSide] = {"hyla off": engine()}
    for k in args.num_draft_tokens:
        sides[f"hyla ngram k={k}"] = engine(speculative="ngram", num_draft_tokens=k)
    loaded = load_pretrained(args.model)
    rng = random.Random(1)
    vocab = loaded.model.config.vocab_size
    workloads = {"code": [loaded.tokenizer.encode(p).ids for p in code_prompts(args.prompts, args.chars, seed=0)],
                 "random": [[rng.randrange(vocab) for _ in range(300)] for _ in range(args.prompts)]}  # fmt: skip
    llama = contextlib.nullcontext(({}, ()))
    if args.llama_bin is not None:
        context = min(loaded.model.config.max_position_embeddings, 4096)
        outtype = "q8_0" if args.quantize else "f32"
        llama = llama_sides(args.llama_bin, loaded, context, args.llama_spec, outtype)
    with llama as (llama_servers, llama_flags):
        sides.update(llama_servers)
        rows = table_rows(sides, workloads, args.max_tokens, exact=args.quantize is None)
    table = "\n".join(rows)
    machine = machine_description()
    print(f"# {machine}\n{table}")
    if not args.no_append:
        flags = [
            "--model",
            args.model,
            "--prompts",
            str(args.prompts),
            "--max-tokens",
            str(args.max_tokens),
            "--num-draft-tokens",
            *map(str, args.num_draft_tokens),
            *(["--compile"] if args.compile else []),
            *(["--quantize", args.quantize] if args.quantize else []),
            *(["--llama-bin", "DIR", "--llama-spec", *args.llama_spec] if args.llama_bin else []),
        ]
        command = "python benchmarks/speculative.py " + " ".join(flags)
        append_result(
            RESULTS,
            "Speculative decoding (prompt lookup), one user, trained weights",
            f"Machine: {machine}. Model {args.model}; one request at a time, greedy, {args.max_tokens} "
            f"new tokens, medians over {args.prompts} prompts per workload (code: {args.chars}-character "
            "prefixes of standard-library files; random: 300 random token ids), the engines alternating "
            "prompt by prompt"
            + (
                ", int8 (hyla's greedy outputs with speculation counted against its own without)"
                if args.quantize
                else ", every hyla output checked equal to speculation off"
            )
            + "."
            + (
                " llama-server -np 1, all cores, the same token ids, the same weights; its speed is "
                f"its own timings.predicted_per_second; {'q8_0' if args.quantize else 'f32'} GGUF"
                + (" (with --no-repack: repacking its weights crashed llama-server at load)." if llama_flags else ".")
                if args.llama_bin
                else ""
            )
            + (" Both with --compile." if args.compile else ""),
            command,
            table,
        )


if __name__ == "__main__":
    main()
