"""Synthetic token tasks, generated from a seed (no downloads): multi-query associative recall (MQAR).

MQAR (Zoology, Arora et al. 2023) at the token level: ``num_pairs`` distinct keys, each followed by its value,
then filler tokens in which some keys are asked again, each followed by its value. Keys, values and filler come
from three disjoint thirds of a vocabulary's ids. A model can only predict a queried key's value by recalling
the pair from its context: the task that separates attention (exact lookup) from a fixed-size recurrent state.

Training documents are text over a word-level vocabulary (:func:`word_tokenizer`: ``w1 w2 ...``, one id each,
in order after ``<|endoftext|>``), so that ``hyla train`` reads them as any ``.jsonl`` corpus and ``hyla eval
mqar`` asks the trained model with the same thirds of the same ids.
"""

from __future__ import annotations

import itertools
import json
import operator
import random
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from hyla.data.tokenizer import END_OF_TEXT
from hyla.errors import ConfigError


def word_tokenizer(words: int) -> Tokenizer:
    """``<|endoftext|>`` (id 0, special) and the words ``w1`` .. ``w{words}`` (ids 1 .. ``words``), split on
    whitespace; decoding joins words with spaces."""
    vocab = {END_OF_TEXT: 0, **{f"w{i}": i for i in range(1, words + 1)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=END_OF_TEXT))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([END_OF_TEXT])
    return tokenizer


def mqar_document(
    rng: random.Random, ids: Sequence[int], num_pairs: int, length: int, queries: int
) -> tuple[list[int], dict[int, int]]:
    """``[length]`` tokens: ``num_pairs`` key-value pairs, then filler holding ``queries`` of the keys (distinct,
    at most ``num_pairs``) each followed by its value, at random places; and the key -> value map.

    Keys, values and filler come from the first, second and last third of ``ids``.
    """
    third = len(ids) // 3
    if num_pairs > third:
        raise ConfigError(f"mqar: {num_pairs} pairs need {num_pairs} distinct keys; the vocabulary gives {third}")
    queries = min(queries, num_pairs)
    rest = length - 2 * num_pairs
    if rest < 2 * queries or (queries == 0 and rest < 1):
        raise ConfigError(f"mqar: {num_pairs} pairs and {max(queries, 1)} queries need more than {length} tokens")
    keys = rng.sample(ids[:third], num_pairs)
    pairs = {k: rng.choice(ids[third : 2 * third]) for k in keys}
    tokens = [t for k in keys for t in (k, pairs[k])]
    filler = [rng.choice(ids[2 * third :]) for _ in range(rest)]
    # Query i takes the two places from 2 * slot_i: slots of two tokens never overlap.
    for slot, key in zip(sorted(rng.sample(range(rest // 2), queries)), rng.sample(keys, queries), strict=True):
        filler[2 * slot : 2 * slot + 2] = [key, pairs[key]]
    return tokens + filler, pairs


def write_mqar(
    path: str | Path, tokenizer: Tokenizer, documents: int, lengths: Sequence[int], pairs: Sequence[int], seed: int
) -> Path:
    """``documents`` MQAR training documents as ``.jsonl`` segments over ``tokenizer``'s words, trained only on
    the answers (the values that follow a key asked again; everything else is unpredictable noise, which drowns
    the recall signal: measured, a two-layer softmax model trained on every token stayed at chance after 1,500
    steps, trained on the answers it passed 50%). Each document draws its length from ``lengths`` and its pairs
    from ``pairs`` (combinations that fit: at least one filler token per query) and asks every key once."""
    ids = [i for i in range(tokenizer.get_vocab_size()) if tokenizer.id_to_token(i) != END_OF_TEXT]
    shapes = [(n, p) for n in lengths for p in pairs if 4 * p <= n]
    if not shapes:
        raise ConfigError(f"mqar: no length in {list(lengths)} holds the pairs {list(pairs)} and their queries")
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(documents):
            length, num_pairs = rng.choice(shapes)
            tokens, kv = mqar_document(rng, ids, num_pairs, length, queries=num_pairs)
            answer = [i > 2 * num_pairs and tokens[i - 1] in kv for i in range(length)]
            runs = itertools.groupby(zip(tokens, answer, strict=True), key=operator.itemgetter(1))
            parts = [{"text": "".join(f"{tokenizer.id_to_token(t)} " for t, _ in run), "train": trained}
                     for trained, run in runs]  # fmt: skip
            parts.append({"text": "", "train": False})  # the end of text is no answer either
            f.write(json.dumps({"segments": parts}) + "\n")
    return path
