"""Corpus discovery, BPE training, cached token shards with a held-out split, and packing."""

import itertools
import json

import numpy as np
import pytest

from hyla.data.corpus import discover, documents, stdlib_dir
from hyla.data.packing import epoch_batches, packed_batches, pieces
from hyla.data.shards import TokenShard, build_shards, is_eval, train_documents
from hyla.data.tokenizer import END_OF_TEXT, train_bpe
from hyla.errors import DataError
from tests.helpers import small_corpus


def test_default_corpus_is_the_stdlib():
    sources = discover(None)
    assert len(sources) > 500
    assert all(s.path.suffix == ".py" and s.path.is_relative_to(stdlib_dir()) for s in sources)
    assert sources == sorted(sources, key=lambda s: s.path)


def test_user_corpora(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert list(documents(discover(tmp_path / "a.jsonl")[0])) == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object with a 'text' field"):
        list(documents(discover(tmp_path / "bad.jsonl")[0]))
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00")
    assert list(documents(discover(tmp_path / "blob.bin")[0])) == []  # undecodable: skipped
    assert len(discover(tmp_path, "*.jsonl")) == 2
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "missing")
    with pytest.raises(DataError, match="no files matching"):
        discover(tmp_path, "*.txt")


def test_bpe_round_trips_and_respects_the_vocab_size(tmp_path):
    texts = [s for src in discover(small_corpus(tmp_path / "c")) for s in documents(src)]
    tokenizer = train_bpe(texts, vocab_size=300)
    assert tokenizer.get_vocab_size() <= 300
    assert tokenizer.token_to_id(END_OF_TEXT) is not None
    for text in [*texts[:5], "unicode: héllo ✓\n\ttabs"]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe(texts, vocab_size=100)


def test_shards_hold_every_document_once_and_are_cached(tmp_path):
    sources = discover(small_corpus(tmp_path / "c"))
    texts = [t for s in sources for t in documents(s)]
    tokenizer = train_bpe(texts, vocab_size=300)
    shards = build_shards(sources, tokenizer, tmp_path / "cache", eval_fraction=0.2, progress=False)
    assert len(shards["train"]) + len(shards["eval"]) == len(texts)
    assert 0 < len(shards["eval"]) < len(texts)
    decoded = sorted(
        tokenizer.decode(shard.document(i).tolist()) for shard in shards.values() for i in range(len(shard))
    )
    assert decoded == sorted(texts)  # the end-of-text token is special: decode skips it
    eot = tokenizer.token_to_id(END_OF_TEXT)
    assert all(shards["train"].document(i)[-1] == eot for i in range(len(shards["train"])))
    entries = list((tmp_path / "cache").iterdir())
    again = build_shards(sources, tokenizer, tmp_path / "cache", eval_fraction=0.2, progress=False)
    assert list((tmp_path / "cache").iterdir()) == entries  # no second tokenization
    assert np.array_equal(again["eval"].tokens, shards["eval"].tokens)


def test_the_tokenizer_learns_from_the_training_split_only(tmp_path):
    """The held-out loss is only honest if the tokenizer never saw the held-out documents: a word repeated in
    one held-out document becomes no token, the same kind of word in a training document does."""
    path = tmp_path / "docs.jsonl"
    words = [f"zq{chr(97 + i % 26)}{chr(97 + i // 26)}xvw" for i in range(40)]  # one distinctive word per document
    path.write_text("".join(json.dumps({"text": f"{w} " * 50}) + "\n" for w in words))
    (source,) = discover(path)
    held_out = [i for i in range(len(words)) if is_eval(source, i, 0.25)]
    assert 0 < len(held_out) < len(words)
    texts = list(train_documents([source], 0.25))
    assert len(texts) == len(words) - len(held_out)
    vocab = {token.lstrip("Ġ") for token in train_bpe(texts, vocab_size=600).get_vocab()}
    for i, word in enumerate(words):
        assert (word in vocab) == (i not in held_out), word


def test_packing_covers_an_epoch_within_the_budget(tmp_path):
    sources = discover(small_corpus(tmp_path / "c", n=30))
    tokenizer = train_bpe([t for s in sources for t in documents(s)], vocab_size=280)
    shard = build_shards(sources, tokenizer, tmp_path / "cache", eval_fraction=0.0, progress=False)["train"]
    total = int(shard.offsets[-1])
    streamed, batches = [], packed_batches(shard, tokens_per_batch=64, max_seq_len=32, seed=3)
    while sum(len(t) for t in streamed) < total:
        tokens, cu_seqlens, labels = next(batches)
        assert labels is tokens  # a corpus without segments trains on every token
        assert tokens.shape[1] <= 64 and int(cu_seqlens[-1]) == tokens.shape[1]
        assert int(cu_seqlens.diff().max()) <= 32 and int(cu_seqlens.diff().min()) >= 1
        streamed.append(tokens[0].numpy())
    # The batches stream the epoch's pieces in order, each token exactly once (a batch may run into epoch 2).
    epoch = np.concatenate(list(pieces(shard, 32, seed=3)))
    assert len(epoch) == total
    assert np.array_equal(np.concatenate(streamed)[:total], epoch)
    first = [next(packed_batches(shard, 64, 32, seed=3))[0] for _ in range(2)]
    assert np.array_equal(first[0], first[1])


def test_pieces_are_each_documents_cuts_shuffled_across_documents():
    lengths = [0, 1, 31, 32, 33, 64, 65, 100, 7]
    tokens = np.arange(sum(lengths), dtype=np.uint32)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    shard = TokenShard(tokens, offsets)
    cuts = {(int(s), int(min(s + 32, b))) for a, b in itertools.pairwise(offsets) for s in range(a, b, 32)}
    order = [(int(p[0]), int(p[-1]) + 1) for p in pieces(shard, 32, seed=5)]
    assert sorted(order) == sorted(cuts)  # each cut once; no piece crosses a document or is empty
    assert order != sorted(order)  # the epoch's pieces are shuffled, not visited document by document
    assert order == [(int(p[0]), int(p[-1]) + 1) for p in pieces(shard, 32, seed=5)]


def test_unigram_entropy():
    from hyla.data.shards import unigram_entropy

    uniform = TokenShard(np.arange(8, dtype=np.uint16).repeat(5), np.array([0, 40]))
    assert unigram_entropy(uniform, 16) == pytest.approx(np.log(8))
    assert unigram_entropy(TokenShard(np.zeros(9, dtype=np.uint16), np.array([0, 9])), 16) == 0.0


def test_greedy_packing_keeps_order_and_sends_a_too_long_piece_alone():
    import numpy as np
    import torch

    from hyla.data.packing import pack_greedy

    pieces = [np.arange(n) for n in (3, 4, 10, 2, 5)]
    batches = list(pack_greedy(iter(pieces), 8))
    assert [b[1].tolist() for b in batches] == [[0, 3, 7], [0, 10], [0, 2, 7]]
    assert torch.equal(torch.cat([b[0][0] for b in batches]), torch.from_numpy(np.concatenate(pieces)))


def test_segments_not_to_train_on_become_ignored_labels(tmp_path):
    """A prompt/completion line and a segments line: their tokens are the joined text's pieces, and the labels
    keep exactly the trained segments' tokens (the end of text following the last segment)."""
    from hyla.data.corpus import segments
    from hyla.data.synthetic import word_tokenizer

    rows = [{"prompt": "w1 w2 ", "completion": "w3"},
            {"segments": [{"text": "w4 ", "train": False}, {"text": "w5 w6 "}, {"text": "w7", "train": False}]},
            {"text": "w8 w9"}]  # fmt: skip
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (source,) = discover(tmp_path / "s.jsonl")
    assert list(documents(source)) == ["w1 w2 w3", "w4 w5 w6 w7", "w8 w9"]
    assert next(segments(source)) == [("w1 w2 ", False), ("w3", True)]
    shard = build_shards([source], word_tokenizer(9), tmp_path / "cache", 0.0, progress=False)["train"]
    assert shard.mask.tolist() == [0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1]
    batch = next(iter(epoch_batches(shard, 64, 64)))
    kept = {tuple(t for t, y in zip(batch.tokens[0][a:b].tolist(), batch.labels[0][a:b].tolist(), strict=True)
                  if y != -100) for a, b in itertools.pairwise(batch.cu_seqlens.tolist())}  # fmt: skip
    assert kept == {(3, 0), (5, 6), (8, 9, 0)}
    assert all(y in (-100, t) for t, y in zip(batch.tokens[0].tolist(), batch.labels[0].tolist(), strict=True))
    (tmp_path / "bad.jsonl").write_text('{"segments": [{"text": 3}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: expected .*'segments'"):
        list(documents(discover(tmp_path / "bad.jsonl")[0]))
