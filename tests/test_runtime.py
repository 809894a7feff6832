"""What hyla picks for the machine it runs on: the dtype (`--dtype auto`), and the CPU it names in results."""

import torch

import hyla
import hyla.runtime as runtime
from tests.conftest import rel_err


def test_bfloat16_logits_stay_within_their_documented_tolerance_of_float32():
    """What --dtype auto may pick: bfloat16 weights give logits within 3% (of the logits' scale) of float32's, on
    the `demo` preset as initialised (measured ~1%; 97-99% of greedy tokens equal)."""
    model = hyla.HylaForCausalLM(hyla.preset("demo")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 200))
    with torch.no_grad():
        full = model(ids).logits
        half = model.to(torch.bfloat16)(ids).logits
    assert half.dtype == torch.bfloat16 and rel_err(half, full) < 3e-2


def test_cpu_info_reads_this_machine():
    model, flags = runtime.cpu_info()
    assert model and isinstance(flags, set)
