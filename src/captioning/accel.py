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
import re
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from captioning.errors import UserError
from captioning.params import ComputeParams, ParamsError


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
    settings applied: the one call every compute stage makes, before any tensor work."""
    pin_cpu_kernels(compute.cpu_isa)
    device = pick_device(compute.device)
    setup(device, compute.deterministic)
    return device


# The three libraries behind PyTorch's CPU kernels each pick their code path by the CPU's widest
# instruction set, and paths round differently: on an AVX-512/AMX Xeon the default pipeline's
# backbone came out other than on the machine that wrote dvc.lock. Each variable caps one library
# (ATen's elementwise and softmax kernels, oneDNN's convolutions, MKL's matrix products; see
# docs/reproducibility.md); all three are read lazily, at the first kernel that needs them.
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def pin_cpu_kernels(isa: str) -> None:
    """`avx2`: the same CPU kernels on every x86-64 machine with AVX2; `native`: the widest, even
    if the variables are set in the environment (the run must be what its params say)."""
    if isa == "native":
        for key in AVX2:
            os.environ.pop(key, None)
        return
    os.environ.update(AVX2)
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "DEFAULT", "NO AVX"):
        raise RuntimeError("compute.cpu_isa avx2: PyTorch chose its CPU kernels before accel.prepare; "
                           "call it before any tensor work")


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


# A training over several boxes: each box says which node it is and where node 0 waits for the
# others. Per box, so environment variables rather than params (params.yaml must match on every
# box; these differ). Node 0 is the box that runs dvc: its rank-0 process logs and writes outputs.
NODE_RANK, RDZV_ENDPOINT = "CAPTIONING_NODE_RANK", "CAPTIONING_RDZV_ENDPOINT"


def world() -> World:
    """Read torchrun's environment. c10d's rendezvous orders the nodes as it likes (by host name and
    pid), so the global rank here counts node by node in `CAPTIONING_NODE_RANK` order instead: rank
    0 is always on node 0."""
    if "LOCAL_RANK" not in os.environ:
        return World()
    local, per_node = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    return World(node_rank() * per_node + local, int(os.environ["WORLD_SIZE"]), local)


def node_rank() -> int:
    value = os.environ.get(NODE_RANK, "0")
    if not value.isdigit():
        raise UserError(f"{NODE_RANK}={value}: expected this box's node number, 0 for the box that runs dvc")
    return int(value)


def check_node(nodes: int) -> None:
    """Stop a joining box whose number is past `train.nodes` (its params say fewer boxes train)."""
    if node_rank() >= nodes:
        raise ParamsError(f"{NODE_RANK}={node_rank()}, but train.nodes is {nodes}: number the boxes 0 to "
                          f"{nodes - 1}, with the same params.yaml on each")


def relaunch(processes: int, nodes: int, argv: list[str]) -> bool:
    """Run `argv` as `processes` DDP processes on each of `nodes` boxes when the params ask for
    more than one and this process is not one of them yet. True: it ran (and succeeded) there."""
    if processes * nodes == 1 or world().size > 1:
        return False
    command = torchrun_command(processes, nodes, argv)
    print(f"train: {nodes} node(s) x {processes} process(es): {' '.join(command)}", flush=True)
    status = subprocess.run(command).returncode
    if status:
        sys.exit(status)
    return True


def torchrun_command(processes: int, nodes: int, argv: list[str]) -> list[str]:
    """`argv` (this script and its arguments) as `processes` DDP processes on each of `nodes` boxes.

    One box: torchrun --standalone. Several: c10d rendezvous at `CAPTIONING_RDZV_ENDPOINT`
    (host:port of node 0, which hosts it), every box running the same command.
    """
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
    if nodes == 1:
        return [*command, "--standalone", *argv]
    endpoint, node = os.environ.get(RDZV_ENDPOINT, ""), node_rank()
    if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", endpoint):
        raise UserError(f"train.nodes is {nodes}: set {RDZV_ENDPOINT}=HOST:PORT on every box, the address of "
                        f"node 0 (the box that runs dvc) and a free port there (got {endpoint!r})")
    if node >= nodes:
        raise UserError(f"{NODE_RANK}={node}, but train.nodes is {nodes}: number the boxes 0 to {nodes - 1}")
    return [*command, f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=captioning-train", f"--rdzv-conf=is_host={str(node == 0).lower()}", *argv]


def init_distributed(device: torch.device) -> World:
    """Join the process group torchrun set up, at this process's rank in node order (`world`):
    NCCL between GPUs, gloo on CPUs."""
    here = world()
    if here.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=here.rank, world_size=here.size)
    return here


@dataclass(frozen=True)
class Runtime:
    """Where a stage computes: the device, the `compute` params, and this process's place in a
    torchrun job. The one object passed down to every loop that runs tensors."""

    device: torch.device = torch.device("cpu")
    compute: ComputeParams = ComputeParams()
    world: World = World()

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        return autocast(self.device, self.compute.bf16)

    def channels_last(self, tensor_or_module):
        return channels_last(tensor_or_module, self.device)


def runtime(compute: ComputeParams, distributed: bool = False) -> Runtime:
    """`prepare`, then (with `distributed`) join torchrun's process group on this process's GPU."""
    device = prepare(compute)
    if not distributed:
        return Runtime(device, compute)
    here = init_distributed(device)
    return Runtime(device_for(device, here), compute, here)


def leave_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: torch.device, here: World) -> torch.device:
    """One GPU per process under torchrun."""
    if device.type == "cuda" and here.size > 1:
        torch.cuda.set_device(here.local_rank)
        return torch.device("cuda", here.local_rank)
    return device
