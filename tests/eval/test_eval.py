"""hyla eval: recall tasks scored through the engine agree with a full forward per prompt; loss by position
(packed documents) agrees with one document at a time."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import hyla
from hyla.data.synthetic import PASSKEY_NEEDLE, mqar_document
from hyla.data.tokenizer import train_bpe
from hyla.errors import ConfigError
from hyla.eval import loss_by_position, mqar, passkey, save
from hyla.eval.recall import passkey_prompt
from hyla.serve import LLM, EngineConfig
from tests.helpers import byte_tokenizer


def _llm(vocab_size: int = 512, max_model_len: int = 512) -> LLM:
    model = hyla.HylaForCausalLM(hyla.preset("tiny").replace(vocab_size=vocab_size)).eval()
    tokenizer = byte_tokenizer(min(vocab_size, 256))
    return LLM(model, tokenizer, EngineConfig(max_model_len=max_model_len, block_size=8))


def test_mqar_counts_what_a_full_forward_predicts():
    """A 12-id vocabulary (keys 0-3, values 4-7, filler 8-11) so that a random model is right now and then; each
    query's greedy answer through the engine (prefix caching on) is recomputed by a full forward."""
    llm = _llm(vocab_size=12)
    lengths, pairs = [9, 21], [2, 3]
    grid = mqar(llm, lengths, pairs, contexts=6, queries=2, seed=5)
    rng, ids, model = random.Random(5), list(range(12)), llm.engine.model
    for i, length in enumerate(lengths):
        correct = dict.fromkeys(pairs, 0)
        for num_pairs in pairs:
            for _ in range(6):
                context, kv = mqar_document(rng, ids, num_pairs, length - 1, queries=0)
                for key in rng.sample(sorted(kv), 2):
                    with torch.no_grad():
                        logits = model(torch.tensor([[*context, key]])).logits[0, -1, :12]
                    correct[num_pairs] += int(logits.argmax()) == kv[key]
        assert grid.correct[i] == [correct[p] for p in pairs]
        assert grid.trials[i] == [12, 12]
    assert sum(map(sum, grid.correct)) > 0  # the comparison saw right answers, not only wrong ones
    assert grid.chance == 1 / 4


def test_passkey_prompt_hides_the_key_at_the_depth_asked():
    llm = _llm()
    for depth in (0.0, 0.5, 1.0):
        ids = passkey_prompt(llm, 12345, 400, depth)
        text = llm.engine.tokenizer.decode(ids)
        assert 400 - 100 < len(ids) <= 400  # filler comes in whole sentences of ~90 bytes
        needle, start = text.index(PASSKEY_NEEDLE.format(key=12345)), text.index("\n") + 1  # after the intro
        filler = text.rindex("What is") - start - len(PASSKEY_NEEDLE.format(key=12345))
        assert abs((needle - start) / filler - depth) < 0.1
        assert text.endswith("What is the pass key? The pass key is")


def test_passkey_grid_and_its_files(tmp_path):
    llm = _llm()
    grid = passkey(llm, [300, 400], [0.0, 1.0], trials=2, seed=1)
    assert grid.trials == [[2, 2], [2, 2]] and all(0 <= c <= 2 for row in grid.correct for c in row)
    assert grid.table().splitlines()[0] == "| length \\ depth | 0 | 1 |"
    json_path, png = save(grid, tmp_path / "eval", "passkey", "t")
    assert json_path.read_text().startswith("{") and png.read_bytes()[:4] == b"\x89PNG"


def test_tasks_longer_than_the_context_are_refused():
    llm = _llm(max_model_len=128)
    with pytest.raises(ConfigError, match="do not fit the context of 128 tokens"):
        mqar(llm, [64, 256], [2])
    with pytest.raises(ConfigError, match="do not fit"):
        passkey(llm, [300], [0.5])
    with pytest.raises(ConfigError, match="depths must be in"):
        passkey(llm, [100], [1.5])
    with pytest.raises(ConfigError, match="no length in \\[100\\] holds any of the pairs"):
        mqar(llm, [100], [50])
    with pytest.raises(ConfigError, match="distinct keys"):
        mqar(_llm(max_model_len=512), [400], [100])  # 256 byte ids: a third is 85 keys


def test_an_mqar_cell_whose_pairs_do_not_fit_stays_empty():
    grid = mqar(_llm(), [8, 64], [2, 8], contexts=2, queries=2)
    assert grid.trials == [[4, 0], [4, 4]] and grid.table().splitlines()[2].endswith("| - |")


def test_loss_by_position_packed_equals_one_document_at_a_time():
    model = hyla.HylaForCausalLM(hyla.preset("tiny")).eval()
    docs = [torch.randint(0, 512, (n,)).tolist() for n in (5, 40, 17, 33, 2)]
    result = loss_by_position(model, docs, "all", tokens_per_batch=50)  # several batches, several per batch
    sums, counts = torch.zeros(39, dtype=torch.float64), torch.zeros(39)
    for d in docs:
        with torch.no_grad():
            logits = model(torch.tensor([d])).logits[0]
        nll = F.cross_entropy(logits[:-1], torch.tensor(d[1:]), reduction="none")
        sums[: len(d) - 1] += nll.double()
        counts[: len(d) - 1] += 1
    assert result.counts == counts.long().tolist()
    assert torch.allclose(torch.tensor(result.sums, dtype=torch.float64), sums, rtol=1e-5)
    buckets = result.buckets()
    assert [(a, b) for a, b, _, _ in buckets] == [(1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 39)]
    assert buckets[0][2] == pytest.approx(sums[0].item() / 5) and buckets[-1][3] == counts[31:].sum()


def test_loss_reads_the_held_out_documents_of_a_run(tmp_path):
    from hyla.data.corpus import discover
    from hyla.data.shards import is_eval
    from hyla.eval import document_ids

    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n")
    tokenizer = train_bpe(["def f(x):\n    return x\n"] * 5, 280)
    sources = discover(tmp_path)
    docs, split = document_ids(sources, tokenizer, 0.25, 100, 16)
    held = [s for s in sources if is_eval(s, 0, 0.25)]
    assert split == "held-out" and len(docs) == len(held) > 0 and all(len(d) <= 17 for d in docs)
    docs, split = document_ids(sources, tokenizer, None, 7, 16)
    assert split == "all" and len(docs) == 7
