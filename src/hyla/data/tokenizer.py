"""Tokenizers: byte-level BPE trained on a corpus, a model directory's ``tokenizer.json``, or plain bytes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hyla.errors import ConfigError, DataError, RequestError

END_OF_TEXT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int, progress: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer of ``vocab_size`` ids (all 256 bytes, then merges), with ``<|endoftext|>``;
    ``progress`` shows the trainer's progress bars (on a terminal)."""
    if vocab_size < 257:
        raise ConfigError(
            f"a byte-level BPE vocabulary needs at least 257 ids (256 bytes + end of text), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def byte_level_tokenizer() -> Tokenizer:
    """Every byte is one token (ids 0..255): needs no training and can encode any text."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's spelling of raw bytes (GPT-2's): printable Latin-1 bytes stand for themselves, the other
    68 bytes take the characters from U+0100 on, in byte order. Maps each character back to its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


_BYTE_OF = _byte_level_alphabet()


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for, whole even where it holds part of a UTF-8 character (whose text alone
    decodes to U+FFFD): byte-level BPE spells them in its alphabet, SentencePiece-style byte fallback as
    ``<0xAB>``; other tokens are their decoded text's UTF-8."""
    piece = tokenizer.id_to_token(token_id) or ""
    if isinstance(tokenizer.decoder, decoders.ByteLevel) and piece and all(c in _BYTE_OF for c in piece):
        return bytes(_BYTE_OF[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return tokenizer.decode([token_id], skip_special_tokens=False).encode()


def check_tokenizer_fits(num_ids: int, vocab_size: int, model: str = "the model") -> None:
    """:class:`~hyla.errors.ConfigError` unless a tokenizer of ``num_ids`` ids fits a model of ``vocab_size`` (a
    larger one makes some prompts' ids out of the model's range)."""
    if num_ids > vocab_size:
        raise ConfigError(f"the tokenizer has {num_ids} ids but {model} only {vocab_size}: they were not trained "
                          "together (give the model's own tokenizer, --tokenizer on the command line)")  # fmt: skip


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizer.json`` file, or the one in model directory ``path``; :class:`~hyla.errors.DataError` naming
    the file when there is none or it cannot be read (no silent fallback: another tokenizer's ids would be
    garbage to the model)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"{file} is missing: the model directory needs the tokenizer it was trained with "
            "(pass one with --tokenizer PATH/tokenizer.json)"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"cannot read the tokenizer {file}: {e}") from None


def load_chat_template(model_dir: str | Path) -> str | None:
    """The ``chat_template`` of model directory ``model_dir``'s ``tokenizer_config.json`` (as transformers keeps
    it: a string, or a list of ``{"name", "template"}`` of which the one named ``default`` is taken), or None
    without one; :class:`~hyla.errors.DataError` naming the file when it cannot be read."""
    file = Path(model_dir) / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {file}: {e}") from None
    if not isinstance(config, dict):
        raise DataError(f"{file} must hold a JSON object, got {type(config).__name__}")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise DataError(f"{file}: chat_template is a list without a template named 'default' (has {sorted(named)})")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise DataError(f"{file}: chat_template must be a string or a list of named templates, got {template!r:.80}")
    return template


class ChatTemplate:
    """A chat template (Jinja, as transformers' ``chat_template``) compiled in jinja2's immutable sandbox.

    A model directory is data, never code: the sandbox refuses attribute access to Python internals
    (``__globals__``, ``__class__``, ...) and mutation of the values passed in, as transformers and vLLM do.
    ``raise_exception(message)`` inside a template (its way to refuse a conversation) raises
    :class:`~hyla.errors.RequestError` on ``messages``, as does any other failure while rendering; a template
    that does not compile raises :class:`~hyla.errors.DataError` when it is built.
    """

    def __init__(self, source: str | None = None, where: str = "the chat template") -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = DEFAULT_CHAT_TEMPLATE if source is None else source
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
        env.globals["raise_exception"] = _raise_template_exception
        try:
            self._template = env.from_string(self.source)
        except TemplateError as e:
            raise DataError(f"{where} is not a valid Jinja template: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt of ``messages`` (``[{"role", "content"}, ...]``)."""
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token=""
            )
        except _TemplateRefused as e:
            raise RequestError("messages", f"the model's chat template refused them: {e}") from None
        except TemplateError as e:  # the sandbox's refusals (SecurityError) and undefined names among them
            raise RequestError("messages", f"the model's chat template failed on them: {e}") from None


class _TemplateRefused(Exception):
    """``raise_exception`` called inside a chat template."""


def _raise_template_exception(message: str) -> None:
    raise _TemplateRefused(message)


# Without a chat template in the model directory: one ``role: content`` line per message, then ``assistant:``.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
