"""The batching engine against a per-request full forward: prompts of different lengths served together."""

import copy
import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, decoders, models

from hyla.data.tokenizer import byte_level_tokenizer
from hyla.errors import ConfigError
from hyla.serve import LLM, EngineConfig, SamplingParams
from hyla.serve.outputs import SequenceText
from tests.helpers import PATTERNS, byte_tokenizer, full_forward_greedy, random_model

VOCAB = 256  # the byte-level tokenizer's ids; the model's vocabulary is larger


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return random_model(layer_types=PATTERNS["alternating"]).double()


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize(
    ("block_size", "budget", "num_blocks", "max_num_seqs"),
    [
        (16, 512, None, 5),  # everything fits: one chunk per prompt
        (4, 24, None, 5),  # prompts split into chunks, decodes and chunks share steps
        (16, 7, None, 1),  # one request at a time, steps with prompt chunks only
        (8, 40, 14, 5),  # too few blocks for all: the newest requests are preempted and recomputed
        (1, 7, 100, 5),  # one-token blocks, a budget smaller than most prompts, preemption
    ],
)
def test_concurrent_greedy_equals_full_forward(model, block_size, budget, num_blocks, max_num_seqs):
    lengths = [1, 17, 64, 5, 33, 2, 48]
    ps = prompts(lengths, seed=block_size)
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, block_size=block_size,
                          num_blocks=num_blocks, max_model_len=100)  # fmt: skip
    llm = LLM(model, byte_level_tokenizer(), config)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    results = llm.generate(ps, params)
    for prompt, (completion,) in zip(ps, results, strict=True):
        assert completion.token_ids == full_forward_greedy(model, prompt, 12)
        assert completion.finish_reason == "length"
    if num_blocks is not None:
        assert llm.engine.stats.preemptions > 0
    # Everything was given back.
    assert llm.engine.cache.blocks.num_free == llm.engine.config.num_blocks
    assert llm.engine.cache.slots.num_free == config.max_num_seqs


def test_llm_loads_a_model_directory(tmp_path):
    import hyla

    hyla.save_pretrained(hyla.HylaForCausalLM(hyla.preset("tiny")), tmp_path)
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (completion,) = LLM(tmp_path).generate(["def f(x):"], SamplingParams(max_tokens=5, ignore_eos=True, seed=1))[0]
    assert len(completion.token_ids) == 5 and completion.finish_reason == "length"
    again = LLM(tmp_path).generate(["def f(x):"], SamplingParams(max_tokens=5, ignore_eos=True, seed=1))[0][0]
    assert again.token_ids == completion.token_ids  # the seed fixes the sample


def test_long_outputs_under_preemption_equal_full_forward():
    """Recomputing a preempted request whose outputs outnumber a prefill chunk (the chunk ends inside the
    prompt while outputs exist): every token still equals the full forward's."""
    torch.manual_seed(0)
    model = random_model(layer_types=PATTERNS["alternating"], vocab_size=96).double()
    ps = [torch.randint(0, 96, (31,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(3)]
    config = EngineConfig(max_num_seqs=3, max_num_batched_tokens=17, block_size=4, max_model_len=120, num_blocks=30)
    llm = LLM(model, byte_tokenizer(96), config)
    results = llm.generate(ps, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    assert llm.engine.stats.preemptions > 0
    for prompt, (completion,) in zip(ps, results, strict=True):
        assert completion.token_ids == full_forward_greedy(model, prompt, 60, vocab=96)
    assert llm.engine.cache.blocks.num_free == 30 and llm.engine.cache.slots.num_free == 3


def test_token_ids_slice_prompt_and_outputs():
    from hyla.serve.scheduler import Request

    r = Request("r", 0, [1, 2, 3], SamplingParams(), 5, [], torch.Generator(), 0.0, output_ids=[7, 8])
    whole = [1, 2, 3, 7, 8]
    for start in range(6):
        for stop in range(start, 6):
            assert r.token_ids(start, stop) == whole[start:stop]


def test_a_sequence_stops_at_its_end_of_text_token(model):
    """The first greedy token, made the end-of-text id, ends the sequence at once (finish_reason "stop")."""
    llm = LLM(model, byte_level_tokenizer(), EngineConfig(max_num_seqs=2, max_model_len=64))
    prompt = prompts([9], seed=3)[0]
    first = full_forward_greedy(model, prompt, 1)[0]
    llm.engine.inputs.eos_token_id = first
    (completion,) = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0]
    assert completion.token_ids == [first] and completion.finish_reason == "stop"


def greedy_outputs(engine, ps: list[list[int]], max_tokens: list[int]) -> dict[int, list[int]]:
    """Every prompt's greedy tokens, all requests added at once and stepped to the end."""
    outputs = {}
    for i, (prompt, n) in enumerate(zip(ps, max_tokens, strict=True)):
        engine.add_request(str(i), [prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    while engine.has_work():
        for out in engine.step():
            outputs.setdefault(int(out.request_id), []).extend(out.token_ids)
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "quantize"), [(torch.float64, None), (torch.float32, None), (torch.float32, "int8")])
def test_compiled_decode_steps_equal_the_eager_reference(model, dtype, quantize, monkeypatch):
    """``compile=True``: decode steps of 1 to 5 requests (requests arriving, finishing and preempted, so the batch
    and the block tables change size) run the two graphs compiled at start, without recompiling; steps with
    prompt chunks run eager. float64: every greedy token equals a full forward's; float32 (oneDNN-packed
    weights from two requests on, or int8 linear layers): equal to the eager engine's. The three cases compile
    three engines in one process: none may run another's graphs (same code, other modules: an int8 model once
    ran the float32 model's graph here)."""
    if dtype == torch.float32:
        torch.manual_seed(1)
        model = random_model(layer_types=PATTERNS["alternating"])
        eager = LLM(copy.deepcopy(model), byte_level_tokenizer(), dataclasses.replace(CONFIG, quantize=quantize))
    config = dataclasses.replace(CONFIG, compile=True, quantize=quantize)
    llm = LLM(model, byte_level_tokenizer(), config)
    runner = llm.engine.runner
    assert runner.compile_seconds > 0
    compiled, batches = runner._compiled, []

    def counted(ids, step, rows):
        batches.append(len(ids))
        return compiled(ids, step, rows)

    monkeypatch.setattr(runner, "_compiled", counted)
    ps = prompts([1, 17, 64, 5, 33, 2, 48], seed=3)
    max_tokens = [30, 3, 12, 25, 1, 40, 9]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs = greedy_outputs(llm.engine, ps, max_tokens)
    if dtype == torch.float64:
        assert outputs == {i: full_forward_greedy(model, ps[i], n) for i, n in enumerate(max_tokens)}
    else:
        assert outputs == greedy_outputs(eager.engine, ps, max_tokens)
    assert llm.engine.stats.preemptions > 0
    assert set(batches) >= {1, 2, 5}


CONFIG = EngineConfig(max_num_seqs=5, max_num_batched_tokens=24, block_size=4, num_blocks=40, max_model_len=100)


def test_compile_refuses_what_it_cannot_run():
    model = random_model(layer_types=PATTERNS["alternating"]).bfloat16()
    with pytest.raises(ConfigError, match="compile runs on the CPU with a float32 or float64 model"):
        LLM(model, byte_level_tokenizer(), EngineConfig(compile=True, max_model_len=64))


def test_compile_without_a_compiler_is_a_config_error():
    """Inductor's C++ compiler missing: a ConfigError that says what to do, at start."""
    import torch._inductor.config as inductor

    model = random_model(layer_types=PATTERNS["alternating"])
    no_compiler = inductor.patch({"force_disable_caches": True, "cpp.cxx": ("/nonexistent/g++",)})
    with no_compiler, pytest.raises(ConfigError, match=r"install a C\+\+ compiler"):
        LLM(model, byte_level_tokenizer(), EngineConfig(compile=True, max_model_len=64))


def metaspace_tokenizer() -> Tokenizer:
    """Word pieces with SentencePiece's "▁" for a space, whose decoder drops the text's leading space: a decoder
    for which a token's text depends on the tokens before it."""
    pieces = ["▁the", "▁cat", "s", "▁é", "t", "é", "▁", "x"]
    tokenizer = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="x"))
    tokenizer.decoder = decoders.Metaspace()
    return tokenizer


@pytest.mark.parametrize("tokenizer", [byte_level_tokenizer(), metaspace_tokenizer()], ids=["bytes", "metaspace"])
def test_incremental_detokenization_equals_decoding_the_whole_output(tokenizer):
    """After every token the engine's text is the decoding of the whole output so far: random bytes (broken and
    multi-byte UTF-8 characters split across tokens) and pieces whose leading space depends on the context."""
    g = torch.Generator().manual_seed(0)
    utf8 = list("naïve 東京 🐍 ok".encode())
    for trial in range(20):
        n = tokenizer.get_vocab_size()
        ids = torch.randint(0, n, (60,), generator=g).tolist() if trial % 2 else utf8[: 3 + trial] * (n > 255)
        state = SequenceText()
        for end in range(1, len(ids) + 1):
            state.update(tokenizer, ids[:end])
            assert state.text == tokenizer.decode(ids[:end])


def test_a_long_context_model_gets_a_kv_pool_sized_to_memory_not_to_its_context():
    """MiniMax-Text-01's 10M-token context: the default context is capped, the pool follows a memory budget, and
    a pool past the memory available is refused with the limits to change (no allocation is tried)."""
    from hyla.serve.engine import DEFAULT_KV_TOKENS, LLMEngine

    torch.manual_seed(0)
    model = random_model(layer_types=PATTERNS["alternating"], max_position_embeddings=10_240_000)
    engine = LLMEngine(model, byte_level_tokenizer(), EngineConfig(max_num_seqs=2, block_size=16))
    c = engine.config
    assert c.max_model_len == DEFAULT_KV_TOKENS and c.num_blocks * c.block_size == DEFAULT_KV_TOKENS
    kv = 2 * 2 * model.config.num_key_value_heads * model.config.head_dim * 4  # two softmax layers, float32
    budget = EngineConfig(kv_cache_gb=0.001, max_model_len=1000).resolve(10_240_000, kv)
    assert budget.num_blocks == int(0.001 * 2**30 // (16 * kv))
    with pytest.raises(ConfigError, match=r"cannot hold one 100000-token request; .* \(--kv-cache-gb\)"):
        EngineConfig(kv_cache_gb=0.001, max_model_len=100_000).resolve(10_240_000, kv)
    with pytest.raises(ConfigError, match=r"the KV cache of 10,240,000 tokens needs .* GiB, more than the 1.0 GiB"):
        EngineConfig(max_model_len=10_240_000).resolve(10_240_000, kv, available=2**30)


def test_the_servers_compile_default_is_on_only_where_it_can_compile():
    """``hyla serve``'s default: on for a float32 CPU model with a C++ compiler; off, with the reason, without a
    compiler or for a bfloat16 model."""
    import torch._inductor.config as inductor

    from hyla.serve.runner import compile_choice

    model = random_model(layer_types=PATTERNS["alternating"])
    on, why = compile_choice(model)
    assert on and "C++ compiler" in why
    with inductor.patch({"cpp.cxx": ("/nonexistent/g++",)}):
        assert compile_choice(model) == (False, "no C++ compiler found (install g++ to compile the decode steps)")
    on, why = compile_choice(random_model(layer_types=PATTERNS["alternating"]).bfloat16())
    assert not on and "float32" in why


def test_serve_falls_back_to_the_eager_forward_when_its_default_compile_fails(tmp_path, monkeypatch):
    """The default chose to compile (and with it speculative decoding), the compile failed (here: the compiler
    vanished): the server says so and serves eager, without speculation; an explicit compile=True still stops with
    the error (the test above)."""
    import threading

    import torch._inductor.config as inductor

    import hyla
    from hyla.bench.serve import free_port
    from hyla.serve import api
    from hyla.serve.config import ServerConfig

    hyla.save_pretrained(random_model(layer_types=PATTERNS["alternating"]), tmp_path)
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setattr(api, "compile_choice", lambda model: (True, "chosen by the test"))
    stop, lines = threading.Event(), []

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("hyla: serving"):
            stop.set()

    server = ServerConfig(port=free_port(), shutdown_timeout=0)
    with inductor.patch({"force_disable_caches": True, "cpp.cxx": ("/nonexistent/g++",)}):
        api.serve(tmp_path, stop, server, EngineConfig(max_model_len=64), log=log, auto_compile=True,
                  auto_speculative=True)  # fmt: skip
    assert lines[0] == "hyla: compile on (the default: chosen by the test; --no-compile/--compile to choose)"
    assert lines[1] == ("hyla: speculative decoding ngram (the default with compiled decode steps; --speculative "
                        "ngram/off to choose)")  # fmt: skip
    assert any("install a C++ compiler" in line and line.endswith("; serving the eager forward, speculative decoding "
                                                                  "off") for line in lines)  # fmt: skip
    assert any(line.startswith("hyla: serving") and "compiled" not in line for line in lines)
