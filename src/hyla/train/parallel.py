"""Data-parallel sharded training with PyTorch's FSDP2 (``fully_shard``): the one place that knows about it.

Launched by ``torchrun --nproc_per_node N -m hyla train ...``: NCCL on GPUs, gloo on CPUs. The model code
stays single-device; :func:`parallelize` shards each decoder layer and then the root (embeddings, final norm,
LM head), as torchtitan does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method


@dataclass
class World:
    rank: int = 0
    size: int = 1
    mesh: DeviceMesh | None = None
    owner: bool = False  # this World started the process group, and its shutdown ends it

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """The process group of a ``torchrun`` launch (``WORLD_SIZE > 1``), else a world of one. A group already
    started (``hyla sweep`` holds one across its runs) is joined, and only its starter's :func:`shutdown` ends it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return World(dist.get_rank(), size, init_device_mesh(device, (size,)), owner)


def parallelize(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard ``model`` (a :class:`~hyla.model.HylaForCausalLM`) over ``mesh`` with FSDP2, in place."""
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "loss")  # training calls model.loss(), not model()
    return model


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def full_state_dict(model: nn.Module, world: World) -> dict[str, Tensor]:
    """Every parameter whole, on the CPU (a collective: every rank calls it)."""
    if world.size == 1:
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def to_float(x: Tensor) -> float:
    """A scalar that may be a DTensor (a sharded model's gradient norm)."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.owner and dist.is_initialized():
        dist.destroy_process_group()
