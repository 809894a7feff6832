"""Benchmark harnesses behind `hyla bench ...`, and what every benchmark records of the machine it ran on."""

import platform

import torch


def machine_description(device: str = "cpu") -> str:
    """The CPU (or, for ``device="cuda"``, the GPU) and torch build a result was measured on, for RESULTS.md."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
