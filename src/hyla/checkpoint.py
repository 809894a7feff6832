"""Model directories on disk: ``config.json`` + ``model.safetensors`` (or shards and an index), as transformers.

``load`` reads what transformers' ``MiniMaxForCausalLM.save_pretrained`` writes, and hyla's own directories
(the same layout); ``save_pretrained`` writes that layout atomically: into a temporary sibling directory
that replaces the target only once every file is complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from hyla.atomic import atomic_directory, recover_directory
from hyla.data.tokenizer import ChatTemplate, check_tokenizer_fits, load_chat_template, load_tokenizer
from hyla.errors import CheckpointError, ConfigError
from hyla.interop.transformers import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
from hyla.model import HylaForCausalLM

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Files a save writes; anything else already in the target directory (a tokenizer, ...) is kept.
_OWN = ("config.json", "generation_config.json", WEIGHTS, INDEX)


def find_model_dir(path: str | Path) -> Path:
    """The model directory at ``path``: ``path`` itself, or the model of a training run directory
    (``path/checkpoint/model``); :class:`CheckpointError` saying what is there otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist or is not a directory")
    if (path / "config.json").is_file():
        return path
    if (path / "train.json").is_file():  # a run directory: a save killed between renames is finished first
        recover_directory(path / "checkpoint")
    if (path / "checkpoint" / "model" / "config.json").is_file():
        return path / "checkpoint" / "model"
    if (path / "train.json").is_file():
        raise CheckpointError(f"{path} is a training run without a checkpoint yet (it writes checkpoint/model)")
    raise CheckpointError(f"{path} is not a model directory: it has no config.json (nor checkpoint/model/)")


def read_config(path: str | Path):
    """The :class:`~hyla.config.HylaConfig` of a model directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist or is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: a model directory needs config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object of config fields, got a {type(raw).__name__}")
    try:
        return config_from_hf(raw)
    except (ConfigError, KeyError) as e:
        detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{config_file}: {detail}") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = [path / WEIGHTS]
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path / INDEX} is not a valid safetensors index: {e}") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    elif not files[0].is_file():
        raise CheckpointError(f"no weights in {path}: expected {WEIGHTS} or {INDEX}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"weight shard {file} is missing")
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {file}: {e}") from None
    return tensors


def load(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a model directory into a :class:`~hyla.model.HylaForCausalLM` (eval mode).

    Tensors keep their stored dtype unless ``dtype`` is given. Missing, unexpected or mis-shaped tensors raise
    :class:`CheckpointError` naming the tensor.
    """
    path = Path(path)
    config = read_config(path)
    with torch.device("meta"):
        model = HylaForCausalLM(config)
    expected = model.state_dict()
    try:
        state = state_dict_from_hf(_read_tensors(path), config)
    except (KeyError, CheckpointError) as e:  # a tensor missing from the file
        raise CheckpointError(f"{path}: {e.args[0]}") from None
    for name, ref in expected.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name not in state:
            raise CheckpointError(f"{path}: missing tensor {name!r} (expected shape {tuple(ref.shape)})")
        if state[name].shape != ref.shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(state[name].shape)}, expected {tuple(ref.shape)}"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]} for this config")
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers()
    return model.to(device=device, dtype=dtype).eval()  # dtype None keeps the stored dtypes


def _shards(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    return shards


def save_pretrained(
    model: HylaForCausalLM, path: str | Path, tokenizer: Tokenizer | None = None, max_shard_size: int = 5 * 2**30
) -> None:
    """Write ``model`` to directory ``path`` in transformers' MiniMax layout, atomically; with ``tokenizer``, its
    ``tokenizer.json`` too (what ``hyla serve``, ``generate`` and ``chat`` need beside the weights).

    Shards larger than ``max_shard_size`` bytes are split, with a ``model.safetensors.index.json``.
    Other files already in ``path`` (a tokenizer, ...) are kept.
    """
    path = Path(path)
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer.get_vocab_size(), model.config.vocab_size)
    dtype = next(model.parameters()).dtype
    tensors = {k: v.detach().cpu() for k, v in state_dict_to_hf(model.state_dict(), model.config).items()}
    with atomic_directory(path) as tmp:
        if path.is_dir():
            for item in path.iterdir():
                if item.name not in _OWN and not (item.name.startswith("model-") and item.suffix == ".safetensors"):
                    copy = shutil.copytree if item.is_dir() else shutil.copy2
                    copy(item, tmp / item.name)
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model.config, dtype), indent=2) + "\n")
        shards = _shards(tensors, max_shard_size)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], tmp / WEIGHTS, metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata=metadata)
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")


@dataclass
class Pretrained:
    """What a model directory holds for running the model: the weights, the tokenizer, the chat template."""

    model: HylaForCausalLM
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None  # compiled in jinja2's sandbox; None: the directory has none
    path: Path | None  # the model directory (a run directory's checkpoint/model); None: not read from disk


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    tokenizer: str | Path | None = None,
) -> Pretrained:
    """The one loader of a model or ``hyla train`` run directory with its tokenizer (``tokenizer``: another
    ``tokenizer.json``) and chat template: everything checked (the tokenizer's ids against the model's, the
    template compiled) before the weights are read, each mistake one :class:`~hyla.errors.HylaError`."""
    path = find_model_dir(path)
    vocab = load_tokenizer(tokenizer or path)
    config = read_config(path)
    check_tokenizer_fits(vocab.get_vocab_size(), config.vocab_size, f"the model in {path}")
    source = load_chat_template(path)
    template = None if source is None else ChatTemplate(source, f"the chat_template of {path}")
    return Pretrained(load(path, dtype=dtype, device=device), vocab, template, path)
