"""What a speculative verify step costs against a decode step: the bar a draft's acceptance must clear.

One request (``max_num_seqs=1``) on a preset's weights (random: only the cost is measured here, never a speed-up),
decoding after a 256-token prompt. Each engine's steps carry ``k`` drafted tokens from a fixed proposer (random
ids: all rejected, so every step also rewinds its lightning states), ``k = 0`` being a plain decode step; the
engines alternate, 20 steps each, medians of 5. A step with ``k`` drafts makes ``1 + accepted`` tokens, so
speculation pays when the tokens a step keeps exceed its cost ratio to a decode step. On a MoE model the ``k + 1``
tokens route to more experts than one token: with 8 experts top-2, 5 tokens touch 6.1 experts on average (uniform
routing) against 2, which the ratio includes; the `weight-read floor` column is that ratio in weights read
(:func:`weight_floor`), the bound where reading weights is the step's cost.

With ``--compile`` every engine runs its steps compiled, as ``hyla serve --compile`` does: the plain decode steps
(``k = 0``) through the decode graphs, the steps with drafts through the verify graphs.

With ``--packed`` (eager) each ``k`` also runs through the packed prefill path that drafted steps took before the
verify step (and still take beside prompt chunks or without the C++ kernels), rewinding in closed form.

Usage: python benchmarks/verify_cost.py [--preset small] [--quantize int8] [--compile | --packed] [--drafts 1 2 4 8]
       [--no-append]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from pathlib import Path

import torch

import hyla
from hyla.bench import append_result, machine_description
from hyla.data.tokenizer import byte_level_tokenizer
from hyla.runtime import tune_malloc
from hyla.serve import EngineConfig, SamplingParams
from hyla.serve.engine import LLMEngine
from hyla.serve.speculative import NgramProposer

RESULTS = Path(__file__).with_name("RESULTS.md")


class RandomDrafts(NgramProposer):
    """A proposer drafting ``k`` random token ids every step, whatever the step costs or the drafts' fate."""

    def __init__(self, k: int, vocab: int) -> None:
        super().__init__(k)
        self.vocab, self.rng = vocab, random.Random(0)

    def propose(self, key, tokens, num_tokens: int, limit: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(min(self.num_draft_tokens, limit))]


def expected_experts(tokens: int, top_k: int, experts: int) -> float:
    """Distinct experts ``tokens`` tokens touch when each picks ``top_k`` of ``experts`` uniformly."""
    return experts * (1 - (1 - top_k / experts) ** tokens)


def weight_floor(model: hyla.HylaForCausalLM, tokens: int) -> float:
    """Weights a step of ``tokens`` tokens reads over one token's (the embedding aside): the experts' share grows
    with the experts the tokens touch (:func:`expected_experts`), the rest is read once. The bound a verify
    step's cost ratio cannot go below where reading weights dominates the step."""
    c = model.config
    experts = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
    rest = sum(p.numel() for p in model.parameters()) - experts - model.model.embed_tokens.weight.numel()
    per_expert = experts / c.num_experts
    one = rest + per_expert * c.num_experts_per_tok
    return (rest + per_expert * expected_experts(tokens, c.num_experts_per_tok, c.num_experts)) / one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["small", "medium"])
    parser.add_argument("--quantize", choices=["int8"], default=None)
    parser.add_argument("--drafts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--compile", action="store_true", help="every step compiled (see above)")
    parser.add_argument("--packed", action="store_true", help="also each k through the packed path (eager only)")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    tune_malloc()
    torch.manual_seed(0)
    config = hyla.preset(args.preset, vocab_size=8192)
    base = hyla.HylaForCausalLM(config).eval()
    prompt = torch.randint(0, 256, (256,)).tolist()
    if args.packed and args.compile:
        parser.error("--packed runs eager (the packed path has no compiled graph)")
    engines = {}
    cases = [(0, False), *((k, False) for k in args.drafts), *((k, True) for k in args.drafts if args.packed)]
    for k, packed in cases:
        spec = dict(speculative="ngram", num_draft_tokens=k) if k else {}
        engine = LLMEngine(copy.deepcopy(base), byte_level_tokenizer(), EngineConfig(max_model_len=2048,
                           max_num_seqs=1, quantize=args.quantize, compile=args.compile, **spec))  # fmt: skip
        if k:
            engine.scheduler.proposer = RandomDrafts(k, config.vocab_size)
        if packed:  # any decode kernel but the C++ one sends drafted steps through the packed (prefill) path
            kernel = engine.runner.lightning_decode
            engine.runner.lightning_decode = lambda *xs, kernel=kernel: kernel(*xs)
        engine.add_request("0", [prompt], SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True))
        for _ in range(3):  # the prefill, then warm decode steps
            engine.step()
        engines[k, packed] = engine
    times: dict[tuple[int, bool], list[float]] = {k: [] for k in engines}
    for _ in range(5):
        for k, engine in engines.items():
            start = time.perf_counter()
            for _ in range(20):
                engine.step()
            times[k].append((time.perf_counter() - start) / 20 * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    c = config
    lines = ["| drafts k | step ms | cost vs a decode step | experts touched (uniform routing) | weight-read floor |",
             "|---|---|---|---|---|"]  # fmt: skip
    for (k, packed), t in ms.items():
        touched = expected_experts(k + 1, c.num_experts_per_tok, c.num_experts)
        name = f"{k}, packed path" if packed else str(k)
        floor = weight_floor(base, k + 1)
        lines.append(
            f"| {name} | {t:.2f} | {t / ms[0, False]:.2f}x | {touched:.1f} of {c.num_experts} | {floor:.2f}x |"
        )
    table = "\n".join(lines)
    name = f"{args.preset}{', int8' if args.quantize else ', float32'}{', compiled' if args.compile else ''}"
    header = (f"Machine: {machine_description()}. Preset `{args.preset}` (vocab 8192, random weights), "
              f"{'int8 linear layers and experts' if args.quantize else 'float32'}, "
              f"{'every step compiled (decode and verify graphs)' if args.compile else 'eager'}; one request after a "
              "256-token prompt; k random drafts a step (all rejected: each step rewinds), medians of 5 "
              "alternations of 20 steps" + ("; `packed path`: the drafted steps through the prefill path and the "
              "closed-form rewind, as before the verify step." if args.packed else "."))  # fmt: skip
    print(header)
    print(table)
    if not args.no_append:
        quantize = " --quantize int8" if args.quantize else ""
        quantize += " --compile" if args.compile else ""
        quantize += " --packed" if args.packed else ""
        command = (f"python benchmarks/verify_cost.py --preset {args.preset}{quantize} "
                   f"--drafts {' '.join(map(str, args.drafts))}")  # fmt: skip
        append_result(RESULTS, f"Speculative verify step vs decode step ({name})", header, command, table)


if __name__ == "__main__":
    main()
