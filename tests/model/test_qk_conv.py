"""The recall study's opt-in lightning q/k convolution (``lightning_qk_conv``, not MiniMax's): the op against a
naive loop, the packed training path against one forward per document, the serving engine (chunks, decodes,
preemption, prefix caching) against a full forward per token, and every path that cannot take it refuses it."""

import pytest
import torch

import hyla
from hyla.config import HylaConfig
from hyla.data.tokenizer import byte_level_tokenizer
from hyla.errors import ConfigError
from hyla.interop.gguf import check_exportable
from hyla.interop.transformers import config_to_hf
from hyla.ops.conv import short_conv
from hyla.serve import LLM, EngineConfig, SamplingParams
from tests.helpers import PATTERNS, full_forward_greedy, random_model


def naive_conv(x: torch.Tensor, weight: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    out, start = torch.zeros_like(x), 0
    for n in lengths:
        for t in range(n):
            for j in range(len(weight)):
                if t - j >= 0:
                    out[0, start + t] += weight[j] * x[0, start + t - j]
        start += n
    return out


@pytest.mark.parametrize("taps", [2, 4])
def test_short_conv_equals_a_naive_loop_and_never_crosses_a_document(taps):
    lengths = [1, 5, 2, 9]
    x, weight = torch.randn(1, sum(lengths), 6, dtype=torch.float64), torch.randn(taps, 6, dtype=torch.float64)
    cu = torch.tensor([0, 1, 6, 8, 17])
    torch.testing.assert_close(short_conv(x, weight, cu), naive_conv(x, weight, lengths))
    torch.testing.assert_close(short_conv(x[:, 8:], weight), naive_conv(x[:, 8:], weight, [9]))


def conv_model(**overrides) -> hyla.HylaForCausalLM:
    torch.manual_seed(0)
    return random_model(layer_types=PATTERNS["alternating"], lightning_qk_conv=3, **overrides).double()


def test_packed_documents_equal_one_forward_each():
    model = conv_model()
    docs = [torch.randint(0, 256, (n,)) for n in (3, 17, 1, 8)]
    packed = model(torch.cat(docs)[None], cu_seqlens=torch.tensor([0, 3, 20, 21, 29])).logits[0]
    alone = torch.cat([model(d[None]).logits[0] for d in docs])
    torch.testing.assert_close(packed, alone)


def test_a_new_model_starts_with_the_identity_convolution():
    config = hyla.preset("tiny").replace(lightning_qk_conv=4)
    plain, conv = hyla.HylaForCausalLM(config.replace(lightning_qk_conv=0)), hyla.HylaForCausalLM(config)
    plain.reset_parameters(seed=3)
    conv.reset_parameters(seed=3)
    ids = torch.randint(0, config.vocab_size, (1, 21))
    torch.testing.assert_close(conv(ids).logits, plain(ids).logits)


@pytest.mark.parametrize(("budget", "num_blocks", "caching"), [(64, None, True), (7, 12, False), (5, None, True)])
def test_the_engine_equals_a_full_forward_per_token(budget, num_blocks, caching):
    model = conv_model()
    g = torch.Generator().manual_seed(budget)
    system = torch.randint(0, 256, (21,), generator=g).tolist()
    ps = [system + torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 6, 15)] + [[7], system[:16]]
    config = EngineConfig(max_num_seqs=3, max_num_batched_tokens=budget, block_size=4, num_blocks=num_blocks,
                          max_model_len=48, enable_prefix_caching=caching, snapshot_every=8)  # fmt: skip
    llm = LLM(model, byte_level_tokenizer(), config)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for _ in range(2):  # the second time, cached prefixes restore their states and convolution histories
        for prompt, (completion,) in zip(ps, llm.generate(ps, params), strict=True):
            assert completion.token_ids == full_forward_greedy(model, prompt, 10)
    if num_blocks is not None:
        assert llm.engine.stats.preemptions > 0
    if caching:
        assert llm.engine.stats.hit_tokens > 0


def test_what_cannot_run_it_refuses_it(tmp_path):
    with pytest.raises(ConfigError, match="lightning_qk_conv must be 0"):
        HylaConfig(lightning_qk_conv=1)
    config = hyla.preset("tiny").replace(lightning_qk_conv=2)
    assert config_to_hf(config)["model_type"] == "hyla_minimax_qk_conv"  # not a MiniMax to transformers
    with pytest.raises(ConfigError, match="lightning_qk_conv"):
        check_exportable(config)
    with pytest.raises(ConfigError, match="compile does not take"):
        LLM(hyla.HylaForCausalLM(config), byte_level_tokenizer(), EngineConfig(compile=True))
    model = conv_model()
    hyla.save_pretrained(model, tmp_path, tokenizer=byte_level_tokenizer())
    loaded = hyla.load_pretrained(tmp_path, dtype=torch.float64).model
    assert loaded.config.lightning_qk_conv == 3
    taps = [[layer.self_attn.qk_conv for layer in m.model.layers if layer.is_lightning] for m in (loaded, model)]
    assert len(taps[0]) == 2 and all(torch.equal(a, b) for a, b in zip(*taps, strict=True))
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="hyla_minimax_qk_conv"):  # transformers refuses it; it does not guess
        transformers.AutoConfig.from_pretrained(tmp_path)
