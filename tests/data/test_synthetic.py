"""Synthetic MQAR: the layout (pairs, then filler holding each query and its value), the thirds of the ids, and
the .jsonl round trip through the word tokenizer and the training shards."""

import random

import pytest

from hyla.data.corpus import discover, documents
from hyla.data.shards import build_shards
from hyla.data.synthetic import (
    PASSKEY_FILLER,
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    mqar_document,
    passkey_layout,
    passkey_tokenizer,
    word_tokenizer,
    write_mqar,
    write_passkey,
)
from hyla.errors import ConfigError


@pytest.mark.parametrize("seed", range(5))
def test_an_mqar_document_asks_its_keys_again_amid_filler(seed):
    ids = list(range(1, 31))  # keys 1-10, values 11-20, filler 21-30
    rng = random.Random(seed)
    num_pairs, length, queries = rng.randint(1, 6), rng.randint(30, 41), rng.randint(0, 6)
    tokens, pairs = mqar_document(rng, ids, num_pairs, length, queries)
    assert len(tokens) == length and len(pairs) == num_pairs
    head = 2 * num_pairs
    assert tokens[:head:2] == list(pairs) and tokens[1:head:2] == list(pairs.values())
    assert all(1 <= k <= 10 for k in pairs) and all(11 <= v <= 20 for v in pairs.values())
    rest = tokens[head:]
    asked = [(i, t) for i, t in enumerate(rest) if t <= 10]
    assert len(asked) == min(queries, num_pairs) == len({k for _, k in asked})  # each asked once
    for i, key in asked:
        assert rest[i + 1] == pairs[key]  # followed by its value
    answers = {i + 1 for i, _ in asked}
    assert all(t >= 21 for i, t in enumerate(rest) if i not in answers and t > 10)


def test_mqar_refuses_what_cannot_fit():
    ids = list(range(30))
    with pytest.raises(ConfigError, match="distinct keys"):
        mqar_document(random.Random(0), ids, 11, 100, 0)
    with pytest.raises(ConfigError, match="need more than 9 tokens"):
        mqar_document(random.Random(0), ids, 3, 9, 2)
    with pytest.raises(ConfigError, match="no length"):
        write_mqar("unused.jsonl", word_tokenizer(30), 1, [8], [4], 0)


def test_mqar_documents_train_on_the_answers_only(tmp_path):
    tokenizer = word_tokenizer(30)
    assert tokenizer.get_vocab_size() == 31 and tokenizer.encode("w1 w30").ids == [1, 30]
    path = write_mqar(tmp_path / "mqar.jsonl", tokenizer, 40, [16, 32], [2, 4], seed=1)
    texts = list(documents(discover(path)[0]))
    assert len(texts) == 40 and {len(t.split()) for t in texts} == {16, 32}
    shards = build_shards(discover(path), tokenizer, tmp_path / "cache", 0.1, progress=False)
    for split in ("train", "eval"):
        shard = shards[split]
        for i in range(len(shard)):
            doc, mask = shard.document(i), shard.mask[shard.offsets[i] : shard.offsets[i + 1]]
            assert doc[-1] == 0 and doc[:-1].min() >= 1 and doc[:-1].max() <= 30
            num_pairs = int(((doc >= 1) & (doc <= 10)).sum()) // 2  # keys: each pair's and each query's
            pairs = {int(doc[j]): int(doc[j + 1]) for j in range(0, 2 * num_pairs, 2)}
            trained = [j for j in range(len(doc)) if mask[j]]
            asked = [j + 1 for j in range(2 * num_pairs, len(doc) - 1) if 1 <= doc[j] <= 10]
            assert trained == asked and all(doc[j] == pairs[doc[j - 1]] for j in trained)
    again = write_mqar(tmp_path / "again.jsonl", tokenizer, 40, [16, 32], [2, 4], seed=1)
    assert again.read_text() == path.read_text()  # the same seed, the same documents


def test_passkey_documents_train_on_the_key_after_the_question(tmp_path):
    tokenizer = passkey_tokenizer()
    encode = lambda text: tokenizer.encode(text).ids  # noqa: E731
    path = write_passkey(tmp_path / "passkey.jsonl", tokenizer, 30, [128, 200], seed=3)
    shards = build_shards(discover(path), tokenizer, tmp_path / "cache", 0.1, progress=False)
    question, lengths = encode(PASSKEY_QUESTION), set()
    for split in ("train", "eval"):
        shard = shards[split]
        for i in range(len(shard)):
            doc, mask = shard.document(i).tolist(), shard.mask[shard.offsets[i] : shard.offsets[i + 1]]
            assert doc[-1] == 0 and 0 not in doc[:-1]  # every word known: no <|endoftext|> stands in for one
            trained = [doc[j] for j in range(len(doc)) if mask[j]]
            key = tokenizer.decode(trained).replace(" ", "")
            assert len(trained) == 5 and key.isdigit() and 10_000 <= int(key) < 100_000
            prompt = doc[:-6]  # before the five digits and the end of text
            assert prompt[-len(question) :] == question and sum(mask[: len(prompt)]) == 0
            assert tokenizer.decode(prompt).replace(" ", "").count(key) == 2  # the needle says it twice
            lengths.add(len(prompt))
    windows = {target: [n for n in lengths if target - 24 < n <= target] for target in (128, 200)}  # whole lines
    assert all(windows.values()) and sum(map(len, windows.values())) == len(lengths)


def test_passkey_tokens_do_not_depend_on_how_the_prompt_is_cut():
    """hyla eval passkey encodes the parts one by one; training encodes the text whole: the same tokens."""
    tokenizer = passkey_tokenizer()
    encode = lambda text: tokenizer.encode(text).ids  # noqa: E731
    for depth in (0.0, 0.4, 1.0):
        before, after = passkey_layout(encode, 300, depth)
        parts = [PASSKEY_INTRO, *[PASSKEY_FILLER] * before, PASSKEY_NEEDLE.format(key=40213),
                 *[PASSKEY_FILLER] * after, PASSKEY_QUESTION]  # fmt: skip
        assert [t for part in parts for t in encode(part)] == encode("".join(parts))
        assert before + after == (300 - 26 - 23 - 10) // 24 and abs(before / (before + after) - depth) <= 0.05
    with pytest.raises(ConfigError, match="cannot hold the intro"):
        passkey_layout(encode, 40, 0.5)
