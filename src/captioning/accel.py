"""The device and the runtime switches, in one place: which device (`compute.device`), bf16
autocast, channels_last for the CNN, cuDNN autotuning, torch.compile, and the process group for
DistributedDataParallel.

Everything here is a no-op on CPU (and MPS) so CPU runs give the same numbers with the switches
on or off: bf16 autocast on CPU would round activations, and channels_last changes the order of
floating-point sums in oneDNN convolutions.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def prepare(compute) -> torch.device:
    """The device `compute` (the params' `compute` section) names, with the process-wide
    settings applied: the one call every compute stage makes."""
    device = pick_device(compute.device)
    setup(device, compute.deterministic)
    return device


def setup(device: torch.device, deterministic: bool) -> None:
    """Process-wide settings, before the first CUDA call."""
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        # Fixed input shapes (the CNN sees image_size x image_size): autotuning pays off at once.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); nothing elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def channels_last(tensor_or_module, device: torch.device):
    """NHWC memory layout for convolutions on CUDA (tensor cores want it); unchanged elsewhere."""
    if device.type == "cuda":
        return tensor_or_module.to(memory_format=torch.channels_last)
    return tensor_or_module


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile when asked: the first steps pay a compile of tens of seconds, so it is a param."""
    return torch.compile(module) if enabled else module


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """Read torchrun's environment."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> World:
    """Join the process group torchrun set up: NCCL between GPUs, gloo on CPUs."""
    here = world()
    if here.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return here


def leave_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: torch.device, here: World) -> torch.device:
    """One GPU per process under torchrun."""
    if device.type == "cuda" and here.size > 1:
        torch.cuda.set_device(here.local_rank)
        return torch.device("cuda", here.local_rank)
    return device
