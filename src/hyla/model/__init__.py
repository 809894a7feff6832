"""nn.Modules that hold weights and call ``hyla.ops``; no I/O, no distributed code."""

from hyla.model.cache import Cache
from hyla.model.decoder import CausalLMOutput, HylaForCausalLM

__all__ = ["Cache", "CausalLMOutput", "HylaForCausalLM"]
