"""Context-length scaling: lightning vs softmax attention, one layer and the whole hybrid model.

For each length: forward time, forward+backward time and peak memory of

- ``hyla lightning``: hyla's lightning-attention layer (Triton kernels on CUDA, the blockwise path on CPU);
- ``transformers lightning``: transformers' ``MiniMaxLightningAttention`` on the same shape (CPU only:
  its Python block loop is the point of comparison there);
- ``lightning projections``: the q/k/v, gate and output projections of hyla's layer alone, forward only —
  the matrix products both lightning layers share, so ``transformers / projections`` bounds the layer's
  forward speed-up;
- ``softmax (SDPA)``: a softmax-attention layer on the same shape (torch SDPA: flash on GPU);
- ``hybrid model``: the whole ``small`` preset (7 lightning : 1 softmax), forward only;
- ``lightning kernel`` and ``SDPA kernel``: the attention functions alone on ``[1, T, H, D]`` q, k, v (no
  projections): hyla's lightning attention vs causal ``scaled_dot_product_attention``;
- ``fla simple_gla kernel``: on CUDA, where flash-linear-attention is installed, its ``chunk_simple_gla``
  with the same fixed per-head decay (the same function as hyla's kernel).

Times are the best of ``repeats`` runs; peak memory is the allocator's peak on CUDA and the peak growth of
the resident set on the CPU (sampled), above what the inputs already hold.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hyla.bench import append_result, machine_description, run_times
from hyla.config import SOFTMAX, preset
from hyla.model import HylaForCausalLM
from hyla.model.attention import SoftmaxAttention
from hyla.model.lightning import LightningAttention
from hyla.ops.attention import softmax_attention
from hyla.ops.lightning import lightning_attention
from hyla.ops.precision import DTYPES
from hyla.ops.rope import rope_cos_sin, rope_inv_freq
from hyla.runtime import trim_malloc, tune_malloc

COLUMNS = (
    "lightning kernel",
    "fla simple_gla kernel",
    "SDPA kernel",
    "hyla lightning",
    "transformers lightning",
    "lightning projections",
    "softmax (SDPA)",
    "hybrid model",
)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def measure(fn: Callable[[], None], device: torch.device, repeats: int) -> tuple[float, float]:
    """(best seconds, peak extra bytes) of ``fn``."""
    best = min(run_times(fn, repeats, device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return best, torch.cuda.max_memory_allocated() - base
    # The opposite of hyla's usual tuning, for this one run: every large tensor is mapped on allocation and
    # unmapped on free, so the resident set follows the live tensors and its sampled peak is what the run needs.
    tune_malloc(mmap_threshold=1 << 16, trim_threshold=1 << 16)
    trim_malloc()
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    fn()
    done.set()
    sampler.join()
    tune_malloc()
    return best, max(peak[0] - base, 0)


def _call(layer: torch.nn.Module, x: torch.Tensor, extra: tuple) -> torch.Tensor:
    out = layer(x, *extra)
    return out[0] if isinstance(out, tuple) else out


class _Projections(torch.nn.Module):
    """The matrix products of a lightning layer's forward, without its attention: ``qkv(x)``, ``out(gate(x))``."""

    def __init__(self, layer: LightningAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layer.qkv_proj(x)
        return self.layer.out_proj(self.layer.output_gate(x))


def _layers(hidden: int, heads: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    config = preset("small", hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                    num_hidden_layers=2, layer_types=["linear_attention", SOFTMAX])  # fmt: skip
    layers: dict[str, torch.nn.Module] = {
        "hyla lightning": LightningAttention(config, 0),
        "softmax (SDPA)": SoftmaxAttention(config, 1),
    }
    layers["lightning projections"] = _Projections(layers["hyla lightning"])
    if device.type == "cpu":
        try:
            from transformers import MiniMaxConfig
            from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention
        except ImportError:
            pass
        else:
            hf = MiniMaxConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=2, block_size=256,
                               layer_types=["linear_attention", "full_attention"])  # fmt: skip
            layers["transformers lightning"] = MiniMaxLightningAttention(hf, 0)
    for layer in layers.values():
        layer.to(device=device, dtype=dtype)
    return layers


def _fla_simple_gla() -> Callable | None:
    """flash-linear-attention's ``chunk_simple_gla`` if it is installed (an optional comparison), else None."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    return chunk_simple_gla


def run(
    lengths: list[int], device: str, dtype: torch.dtype, hidden: int, heads: int, repeats: int, backward: bool
) -> list[dict]:
    """One row per length: ``{"tokens", "<column> fwd", "<column> fwd+bwd", "<column> mem"}`` (seconds, bytes)."""
    dev = torch.device(device)
    layers = _layers(hidden, heads, dev, dtype)
    model = HylaForCausalLM(preset("small")).to(device=dev, dtype=dtype).eval()
    inv_freq = rope_inv_freq(hidden // heads, 1e6, dev)
    slope = 2.0 ** (-8 * (torch.arange(heads, device=dev) + 1) / heads)
    fla = _fla_simple_gla() if dev.type == "cuda" else None
    rows = []
    for t in lengths:
        row: dict = {"tokens": t}
        x = torch.randn(1, t, hidden, device=dev, dtype=dtype, requires_grad=backward)
        rope = rope_cos_sin(torch.arange(t, device=dev)[None], inv_freq, dtype)
        for name, layer in layers.items():
            # transformers' layer takes (x, position_embeddings, attention_mask); the softmax layer needs RoPE.
            extra = {"softmax (SDPA)": (rope,), "transformers lightning": (None, None)}.get(name, ())
            call = functools.partial(_call, layer, x, extra)
            with torch.no_grad():
                row[f"{name} fwd"], row[f"{name} mem"] = measure(call, dev, repeats)
            if backward and name != "lightning projections":
                row[f"{name} fwd+bwd"], _ = measure(lambda call=call: call().sum().backward(), dev, repeats)
        q, k, v = (torch.randn(1, t, heads, hidden // heads, device=dev, dtype=dtype, requires_grad=backward)
                   for _ in range(3))  # fmt: skip
        kernels = {
            "lightning kernel": lambda q=q, k=k, v=v: lightning_attention(q, k, v, slope)[0],
            "SDPA kernel": lambda q=q, k=k, v=v: softmax_attention(q, k, v),
        }
        if fla is not None:
            kernels["fla simple_gla kernel"] = lambda q=q, k=k, v=v: fla(q, k, v, g_gamma=-slope, scale=1.0)[0]

        def fwd_bwd(call: Callable[[], torch.Tensor], q=q, k=k, v=v) -> None:
            call().sum().backward()
            # A kernel's backward ends at dq, dk, dv: adding them into the leaves' .grad of the previous run is
            # not its work (and is a pass over 3 x T x H x D that fits in cache at short lengths only).
            q.grad = k.grad = v.grad = None

        for name, call in kernels.items():
            with torch.no_grad():
                row[f"{name} fwd"], row[f"{name} mem"] = measure(call, dev, repeats)
            if backward:
                row[f"{name} fwd+bwd"], _ = measure(functools.partial(fwd_bwd, call), dev, repeats)
        ids = torch.randint(0, model.config.vocab_size, (1, t), device=dev)
        with torch.inference_mode():
            row["hybrid model fwd"], row["hybrid model mem"] = measure(
                lambda ids=ids: model(ids, logits_to_keep=1), dev, repeats
            )
        rows.append(row)
        print(format_table([row], header=len(rows) == 1), flush=True)
    return rows


def format_table(rows: list[dict], header: bool = True) -> str:
    def cell(row: dict, key: str, scale: float, unit: str) -> str:
        return f"{row[key] * scale:,.1f}{unit}" if key in row else "—"

    cols = [c for c in COLUMNS if any(f"{c} fwd" in r for r in rows)]
    lines = []
    if header:
        titles = [f"{c} {what}" for c in cols for what in ("fwd ms", "fwd+bwd ms", "peak MB")]
        lines += ["| tokens | " + " | ".join(titles) + " |", "|---" * (1 + len(titles)) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            cells += [cell(r, f"{c} fwd", 1e3, ""), cell(r, f"{c} fwd+bwd", 1e3, ""), cell(r, f"{c} mem", 1e-6, "")]
        lines.append(f"| {r['tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, what in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        for c in COLUMNS:
            points = [(r["tokens"], r[f"{c} {what}"]) for r in rows if f"{c} {what}" in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=c)
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="seconds", title=what)
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(
    lengths: list[int],
    device: str,
    dtype: str,
    hidden: int,
    heads: int,
    repeats: int,
    backward: bool,
    out: Path,
    results: Path | None = None,
) -> None:
    """Measure, print the table, and write ``out/context.md`` (machine, command, table) and ``out/context.png``;
    with ``results``, also append the section to that RESULTS.md (the maintainers' record; a user's run is
    never written into the checkout unless asked)."""
    torch_dtype = DTYPES[dtype]
    tune_malloc()
    machine = machine_description(device)
    shape = f"hidden {hidden} = {heads} heads x {hidden // heads}, {dtype}"
    print(f"# context scaling on {device}: {machine}; one layer {shape}")
    rows = run(lengths, device, torch_dtype, hidden, heads, repeats, backward)
    table = format_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "context.png", f"hyla context scaling — {device}, {shape}")
    command = (
        f"hyla bench context --device {device} --dtype {dtype} --lengths {' '.join(map(str, lengths))} "
        f"--hidden {hidden} --heads {heads} --repeats {repeats}{'' if backward else ' --no-backward'}"
    )
    title, preamble = f"Context scaling, {device}", f"Machine: {machine}; {shape}."
    (out / "context.md").write_text(f"# {title}\n\n{preamble}\nCommand: `{command}`\n\n{table}\n")
    if results is not None:
        append_result(results, title, preamble, command, table)
    print(f"wrote {out / 'context.md'} and {out / 'context.png'}{f'; appended to {results}' if results else ''}")
