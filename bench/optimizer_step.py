"""Adam's per-tensor loop against its fused kernel, side by side on this CPU (optim.adam).

    python bench/optimizer_step.py           # ~1 minute on 2 cores

The pipeline's two hot loops at its sizes, each with both optimizers over the same model, rounds
alternating so that drift of the machine hits both alike: the pretrain step (ResNet-18, 128 images
of 32 px, forward + backward + Adam) and the decoder step (embedding 128, LSTM 256, vocab ~60,
128 captions of ~12 tokens, on cached features). Prints the median seconds per step and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


def pretrain_loop():
    cnn = torchvision.models.resnet18(num_classes=165)
    images, targets = torch.randn(128, 3, 32, 32), torch.rand(128, 165).round()
    return list(cnn.parameters()), lambda: nn.functional.binary_cross_entropy_with_logits(cnn(images), targets)


def decoder_loop():
    head = nn.Sequential(nn.Linear(512, 128), nn.BatchNorm1d(128))
    embed, rnn, out = nn.Embedding(60, 128), nn.LSTM(128, 256, batch_first=True), nn.Linear(256, 60)
    features = torch.randn(128, 512)
    lengths = torch.randint(8, 16, (128,)).sort(descending=True).values
    words = torch.randint(0, 60, (128, int(lengths[0])))

    def loss():
        inputs = torch.cat([head(features).unsqueeze(1), embed(words)], 1)
        logits = out(rnn(pack_padded_sequence(inputs, lengths, batch_first=True))[0].data)
        return nn.functional.cross_entropy(logits, torch.randint(0, 60, (logits.size(0),)))

    modules = (head, embed, rnn, out)
    return [p for m in modules for p in m.parameters()], loss


def seconds_per_step(parameters, loss, fused: bool, steps: int) -> float:
    optimizer = torch.optim.Adam(parameters, lr=1e-3, fused=fused)

    def step():
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    step()  # warm-up: kernel selection, allocator, optimizer state
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer per round")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, CPU kernels {torch.backends.cpu.get_cpu_capability()}\n")
    print("| loop | per-tensor Adam s/step | fused Adam s/step | fused / per-tensor |\n|---|---|---|---|")
    for name, make in (("pretrain step", pretrain_loop), ("decoder step", decoder_loop)):
        parameters, loss = make()
        times = {False: [], True: []}
        for _ in range(args.rounds):
            for fused, seconds in times.items():
                seconds.append(seconds_per_step(parameters, loss, fused, args.steps))
        loop, fused = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {loop:.4f} | {fused:.4f} | {fused / loop:.2f}x |")
    print(f"\nmedian of {args.rounds} rounds of {args.steps} steps each")


if __name__ == "__main__":
    main()
