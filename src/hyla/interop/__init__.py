"""transformers' MiniMax <-> hyla: config fields and weight names."""

from hyla.interop.transformers import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf

__all__ = ["config_from_hf", "config_to_hf", "state_dict_from_hf", "state_dict_to_hf"]
