"""hyla: hybrid lightning/softmax-attention MoE language models — train, convert and serve, on CPU and GPU."""

from hyla.checkpoint import load, save_pretrained
from hyla.config import HylaConfig, preset
from hyla.data.tokenizer import byte_level_tokenizer
from hyla.errors import CheckpointError, ConfigError, DataError, RequestError
from hyla.model import HylaForCausalLM

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "HylaConfig",
    "HylaForCausalLM",
    "RequestError",
    "byte_level_tokenizer",
    "load",
    "preset",
    "save_pretrained",
]
__version__ = "0.1.0"
