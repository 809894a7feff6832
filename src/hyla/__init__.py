"""hyla: hybrid lightning/softmax-attention MoE language models — train, convert and serve, on CPU and GPU."""

from hyla.checkpoint import load, save_pretrained
from hyla.config import HylaConfig, preset
from hyla.errors import CheckpointError, ConfigError, DataError, RequestError
from hyla.model import HylaForCausalLM

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "HylaConfig",
    "HylaForCausalLM",
    "RequestError",
    "load",
    "preset",
    "save_pretrained",
]
__version__ = "0.1.0"
