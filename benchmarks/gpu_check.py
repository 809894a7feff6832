"""On a CUDA GPU: hyla's GPU paths against a float64 CPU reference, then prefill speed vs transformers.

Correctness: logits of the ``small`` preset on CUDA (float32 and bfloat16) against hyla in float64 on the CPU,
and parameter gradients of one training step (float32 CUDA vs float64 CPU). Speed: prefill tokens/s
(``logits_to_keep=1``, B=1, bfloat16) of hyla and transformers' MiniMaxForCausalLM on the same weights,
alternating runs, best of ``--repeats``.

Usage (on the GPU machine, from the repository root): PYTHONPATH=src python benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import hyla
from hyla.bench import run_times


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


def best_time(fn, repeats: int) -> float:
    return min(run_times(fn, repeats, "cuda"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from transformers import MiniMaxForCausalLM

    torch.manual_seed(0)
    config = hyla.preset("small")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        hyla.save_pretrained(hyla.HylaForCausalLM(config), tmp)
        ref = hyla.load(tmp, dtype=torch.float64)
        gpu32 = hyla.load(tmp, device="cuda")
        gpu16 = hyla.load(tmp, dtype=torch.bfloat16, device="cuda")
        theirs = MiniMaxForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).cuda().eval()

    ids = torch.randint(0, config.vocab_size, (2, 700))  # not a multiple of the 256-token block
    with torch.no_grad():
        expected = ref(ids).logits
        print(f"logits, CUDA float32 vs CPU float64: rel. err {rel_err(gpu32(ids.cuda()).logits, expected):.1e}")
        print(f"logits, CUDA bfloat16 vs CPU float64: rel. err {rel_err(gpu16(ids.cuda()).logits, expected):.1e}")
        print(
            f"logits, transformers CUDA bfloat16 vs hyla CPU float64: rel. err "
            f"{rel_err(theirs(ids.cuda()).logits, expected):.1e}"
        )

    ids = ids[:, :300]
    ref.train().loss(ids).loss.backward()
    gpu32.train().loss(ids.cuda()).loss.backward()
    worst = max(
        (rel_err(p.grad, q.grad), name) for (name, p), q in zip(gpu32.named_parameters(), ref.parameters(), strict=True)
    )
    print(f"gradients, CUDA float32 vs CPU float64: worst rel. err {worst[0]:.1e} ({worst[1]})")
    gpu32.eval()

    print("| tokens | hyla bf16 tok/s | transformers bf16 tok/s | speed-up |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for t in args.lengths:
            x = torch.randint(0, config.vocab_size, (1, t), device="cuda")
            ours, base = [], []
            for _ in range(args.repeats):
                ours.append(best_time(lambda x=x: gpu16(x, logits_to_keep=1), 1))
                base.append(best_time(lambda x=x: theirs(x, logits_to_keep=1), 1))
            print(f"| {t} | {t / min(ours):,.0f} | {t / min(base):,.0f} | {min(base) / min(ours):.2f}x |")


if __name__ == "__main__":
    main()
