"""hyla: hybrid lightning/softmax-attention MoE language models — train, convert and serve, on CPU and GPU.

The names below load on first use (PEP 562), so that ``import hyla`` (and ``hyla --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hyla.checkpoint import load, load_pretrained, save_pretrained
    from hyla.config import HylaConfig, preset
    from hyla.data.tokenizer import byte_level_tokenizer
    from hyla.errors import CheckpointError, ConfigError, DataError, RequestError
    from hyla.model import HylaForCausalLM

# Each public name and the module that defines it.
_WHERE = {
    "CheckpointError": "hyla.errors",
    "ConfigError": "hyla.errors",
    "DataError": "hyla.errors",
    "RequestError": "hyla.errors",
    "HylaConfig": "hyla.config",
    "preset": "hyla.config",
    "HylaForCausalLM": "hyla.model",
    "byte_level_tokenizer": "hyla.data.tokenizer",
    "load": "hyla.checkpoint",
    "load_pretrained": "hyla.checkpoint",
    "save_pretrained": "hyla.checkpoint",
}
__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "HylaConfig",
    "HylaForCausalLM",
    "RequestError",
    "byte_level_tokenizer",
    "load",
    "load_pretrained",
    "preset",
    "save_pretrained",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'hyla' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
