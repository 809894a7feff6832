"""Synthetic recall tasks, generated from a seed (no downloads): multi-query associative recall (MQAR) and the
passkey.

MQAR (Zoology, Arora et al. 2023) at the token level: ``num_pairs`` distinct keys, each followed by its value,
then filler tokens in which some keys are asked again, each followed by its value. Keys, values and filler come
from three disjoint thirds of a vocabulary's ids. A model can only predict a queried key's value by recalling
the pair from its context: the task that separates attention (exact lookup) from a fixed-size recurrent state.

Training documents are text over a word-level vocabulary (:func:`word_tokenizer`: ``w1 w2 ...``, one id each,
in order after ``<|endoftext|>``), so that ``hyla train`` reads them as any ``.jsonl`` corpus and ``hyla eval
mqar`` asks the trained model with the same thirds of the same ids.

Passkey (Mohtashami & Jaggi 2023): a five-digit number hidden at a depth of repetitive filler text, then "What is
the pass key? The pass key is". :func:`passkey_layout` places the needle for ``hyla eval passkey``;
:func:`write_passkey` writes training documents in the same format, over :func:`passkey_tokenizer`'s words (each
digit a token), trained on the number after the question only.
"""

from __future__ import annotations

import itertools
import json
import operator
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.pre_tokenizers import Digits, Punctuation, WhitespaceSplit

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


PASSKEY_INTRO = (
    "There is an important number hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about it.\n"
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_KEYS = (10_000, 100_000)  # the five-digit numbers: range(*PASSKEY_KEYS)


def passkey_layout(encode: Callable[[str], list[int]], length: int, depth: float) -> tuple[int, int]:
    """How many filler lines go before and after the needle so that the prompt (intro, filler, needle, filler,
    question) holds about ``length`` tokens of ``encode`` with the needle after ``depth`` (0..1) of the filler."""
    fixed = sum(len(encode(text)) for text in (PASSKEY_INTRO, PASSKEY_NEEDLE.format(key=12345), PASSKEY_QUESTION))
    room = length - fixed
    if room < 0:
        raise ConfigError(f"passkey: {length} tokens cannot hold the intro, the needle and the question")
    repeats = room // len(encode(PASSKEY_FILLER))
    before = round(depth * repeats)
    return before, repeats - before


def passkey_tokenizer() -> Tokenizer:
    """``<|endoftext|>`` (id 0, special), the ten digits and the words and punctuation of the passkey texts, one id
    each; text splits at whitespace, punctuation and between digits, so a prompt built from separately encoded
    parts (``hyla eval passkey``) tokenizes as the same text written whole. Decoding joins tokens with spaces."""
    split = pre_tokenizers.Sequence([WhitespaceSplit(), Punctuation(), Digits(individual_digits=True)])
    texts = (PASSKEY_INTRO, PASSKEY_FILLER, PASSKEY_NEEDLE.format(key=1234567890), PASSKEY_QUESTION)
    words = dict.fromkeys(piece for text in texts for piece, _ in split.pre_tokenize_str(text))
    vocab = {END_OF_TEXT: 0, **{word: i for i, word in enumerate(words, start=1)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=END_OF_TEXT))
    tokenizer.pre_tokenizer = split
    tokenizer.add_special_tokens([END_OF_TEXT])
    return tokenizer


def write_passkey(path: str | Path, tokenizer: Tokenizer, documents: int, lengths: Sequence[int], seed: int) -> Path:
    """``documents`` passkey training documents as ``.jsonl`` segments: each a prompt of a length from
    ``lengths`` (tokens of ``tokenizer``) with a random key at a random depth, then the key, the only trained
    segment (the filler is predictable text that would drown the recall signal, as in :func:`write_mqar`)."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text).ids

    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(documents):
            key, depth = rng.randrange(*PASSKEY_KEYS), rng.random()
            before, after = passkey_layout(encode, rng.choice(lengths), depth)
            prompt = PASSKEY_INTRO + PASSKEY_FILLER * before + PASSKEY_NEEDLE.format(key=key)
            parts = [{"text": prompt + PASSKEY_FILLER * after + PASSKEY_QUESTION, "train": False},
                     {"text": f" {key}", "train": True}, {"text": "", "train": False}]  # fmt: skip
            f.write(json.dumps({"segments": parts}) + "\n")
    return path
