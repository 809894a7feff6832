"""hyla: hybrid lightning/softmax-attention MoE language models — train, convert and serve, on CPU and GPU."""

from hyla.checkpoint import CheckpointError, load
from hyla.config import ConfigError, HylaConfig, preset
from hyla.model import HylaForCausalLM

__all__ = ["CheckpointError", "ConfigError", "HylaConfig", "HylaForCausalLM", "load", "preset"]
__version__ = "0.1.0"
