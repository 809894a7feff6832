"""Decoding with the lightning state and the KV cache equals re-running the full forward every step."""

import pytest
import torch

import hyla
from hyla.model import DecodeCache
from hyla.serve import generate
from tests.conftest import rel_err
from tests.model.test_parity import PATTERNS, random_model


@pytest.mark.parametrize("pattern", ["hybrid-7:1", "alternating"])
@pytest.mark.parametrize("prompt_len", [1, 21])
def test_greedy_decode_equals_full_forward(pattern, prompt_len):
    model = random_model(layer_types=PATTERNS[pattern]).double()
    ids = torch.randint(0, model.config.vocab_size, (3, prompt_len))
    tokens = torch.stack(list(generate(model, ids, max_new_tokens=24)), dim=1)
    seq = ids
    with torch.no_grad():
        for _ in range(24):
            nxt = model(seq).logits[:, -1].argmax(-1)
            seq = torch.cat((seq, nxt[:, None]), dim=1)
    assert torch.equal(tokens, seq[:, prompt_len:])


def test_chunked_prefill_logits_equal_one_pass():
    """Feeding a prompt in pieces through the cache gives the logits of the whole prompt at once."""
    model = random_model().double()
    ids = torch.randint(0, model.config.vocab_size, (2, 70))
    cache = DecodeCache()
    with torch.no_grad():
        pieces = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 33), (33, 34), (34, 70))]
        whole = model(ids).logits
    assert rel_err(torch.cat(pieces, dim=1), whole) < 1e-10


def test_sampling_is_seeded():
    model = hyla.HylaForCausalLM(hyla.preset("tiny")).eval()
    ids = torch.randint(0, 512, (2, 5))
    runs = [torch.stack(list(generate(model, ids, 10, temperature=1.0, top_k=20, seed=7))) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_stops_at_eos():
    model = hyla.HylaForCausalLM(hyla.preset("tiny")).eval()
    ids = torch.randint(0, 512, (1, 5))
    first = next(iter(generate(model, ids, 1)))
    assert len(list(generate(model, ids, 10, eos_token_id=int(first[0])))) == 1


def test_vocab_limit_keeps_ids_the_tokenizer_knows():
    model = hyla.HylaForCausalLM(hyla.preset("tiny")).eval()
    ids = torch.randint(0, 512, (4, 3))
    tokens = torch.stack(list(generate(model, ids, 30, temperature=2.0, seed=1, vocab_limit=100)))
    assert int(tokens.max()) < 100
