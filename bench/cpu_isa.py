"""What `compute.cpu_isa: avx2` changes and costs, side by side on this CPU.

    python bench/cpu_isa.py                  # ~2 minutes on 2 cores

Each measurement runs in a fresh process (the kernel choice is made once per process), alternating
native and avx2 so that drift of the machine hits both alike. Printed:
- which op families give other bits under the cap (a matrix product, a convolution, a softmax, an
  LSTM over packed captions), i.e. which library picks its code path by the CPU;
- seconds per training step of the pipeline's two hot loops at its sizes: the pretrain step
  (ResNet-18, 128 images of 32 px, forward + backward + Adam) and the decoder step (LSTM 256,
  embed 128, 128 captions of ~12 tokens, vocab ~60, on cached features).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time


def pretrain_loop():
    """The pretrain step's model and loss: ResNet-18, 128 images of 32 px, 165 concept targets."""
    import torch
    import torchvision
    from torch import nn

    cnn = torchvision.models.resnet18(num_classes=165)
    images, targets = torch.randn(128, 3, 32, 32), torch.rand(128, 165).round()
    return list(cnn.parameters()), lambda: nn.functional.binary_cross_entropy_with_logits(cnn(images), targets)


def decoder_loop():
    """The decoder step's: embed 128, LSTM 256, vocab 60, 128 packed captions of 8-15 tokens."""
    import torch
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence

    embed, rnn, head = nn.Embedding(60, 128), nn.LSTM(128, 256, batch_first=True), nn.Linear(256, 60)
    lengths = torch.randint(8, 16, (128,)).sort(descending=True).values
    words = torch.randint(0, 60, (128, int(lengths[0])))

    def loss():
        logits = head(rnn(pack_padded_sequence(embed(words), lengths, batch_first=True))[0].data)
        return nn.functional.cross_entropy(logits, torch.randint(0, 60, (logits.size(0),)))

    return [*embed.parameters(), *rnn.parameters(), *head.parameters()], loss


def seconds_per_step(loss, optimizer, steps: int) -> float:
    """Mean seconds of forward + backward + `optimizer` step, after one warm-up step (kernel
    selection, allocator, optimizer state)."""
    def step():
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def child(isa: str, steps: int) -> dict:
    import torch
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence

    from captioning import accel

    accel.pin_cpu_kernels(isa)
    torch.manual_seed(0)
    a, b = torch.randn(257, 1031), torch.randn(1031, 263)
    conv, x = nn.Conv2d(64, 64, 3, padding=1), torch.randn(8, 64, 16, 16)
    lstm, seq = nn.LSTM(128, 256, batch_first=True), torch.randn(16, 20, 128)
    with torch.no_grad():
        outs = {"matmul (MKL)": a @ b, "conv (oneDNN)": conv(x), "log_softmax (ATen)": torch.randn(64, 5000).log_softmax(1),
                "packed LSTM": lstm(pack_padded_sequence(seq, torch.full((16,), 20), batch_first=True))[0].data}
    bits = {k: hashlib.md5(v.numpy().tobytes()).hexdigest()[:10] for k, v in outs.items()}

    times = {}
    for name, make in (("pretrain step", pretrain_loop), ("decoder step", decoder_loop)):
        parameters, loss = make()
        times[name] = seconds_per_step(loss, torch.optim.Adam(parameters, 1e-3), steps)
    return {"capability": torch.backends.cpu.get_cpu_capability(), "bits": bits, "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="process pairs (native, avx2)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per loop per process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    runs: dict[str, list[dict]] = {"native": [], "avx2": []}
    for _ in range(args.rounds):
        for isa in runs:
            out = subprocess.run([sys.executable, __file__, "--child", isa, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True).stdout
            runs[isa].append(json.loads(out.strip().splitlines()[-1]))
    native, capped = runs["native"][0], runs["avx2"][0]
    print(f"CPU kernels: native = {native['capability']}, capped = {capped['capability']}\n")
    print("| op | same bits native vs avx2 |\n|---|---|")
    for op in native["bits"]:
        print(f"| {op} | {'yes' if native['bits'][op] == capped['bits'][op] else 'no'} |")
    print("\n| loop | native s/step | avx2 s/step | avx2 / native |\n|---|---|---|---|")
    for loop in native["seconds"]:
        n = statistics.median(r["seconds"][loop] for r in runs["native"])
        c = statistics.median(r["seconds"][loop] for r in runs["avx2"])
        print(f"| {loop} | {n:.4f} | {c:.4f} | {c / n:.2f}x |")
    print(f"\nmedian of {args.rounds} processes each, {args.steps} steps per loop per process")


if __name__ == "__main__":
    main()
