"""The frozen CNN's forward on this CPU by input side, batch size and memory format.

    python bench/cnn_cpu.py            # ~1 min on 2 idle cores

A torchvision resnet18 trunk (random init, eval mode, no grad), the encoder's backbone in
bench/benchmark.py. Prints ms per image (fastest of 3 passes after a warm-up) in NCHW and in
channels_last, and how far the pooled features of the two formats differ: what bounds batched
captioning at 224 px on a CPU, and why channels_last stays GPU-only (docs/benchmarks.md).
"""

from __future__ import annotations

import time

import torch
import torchvision

from captioning.backbone import trunk

SIDES_AND_BATCHES = ((32, 1), (32, 64), (224, 1), (224, 8), (224, 16), (224, 64))


def ms_per_image(net: torch.nn.Module, images: torch.Tensor, passes: int = 3) -> float:
    net(images)  # warm-up: oneDNN picks its kernels on the first call
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        net(images)
        times.append(time.perf_counter() - start)
    return min(times) / len(images) * 1000


def main() -> None:
    torch.manual_seed(0)
    net = trunk(torchvision.models.resnet18()).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    print("| side | batch | NCHW, ms/image | channels_last, ms/image | max feature difference |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for side, batch in SIDES_AND_BATCHES:
            images = torch.randn(batch, 3, side, side)
            net.to(memory_format=torch.contiguous_format)
            nchw, nchw_out = ms_per_image(net, images), net(images)
            net.to(memory_format=torch.channels_last)
            last_images = images.contiguous(memory_format=torch.channels_last)
            last, last_out = ms_per_image(net, last_images), net(last_images)
            difference = (nchw_out - last_out).abs().max().item()
            print(f"| {side} | {batch} | {nchw:.2f} | {last:.2f} | {difference:.1e} |")


if __name__ == "__main__":
    main()
