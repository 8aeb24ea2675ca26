"""Adam's per-tensor loop against its fused kernel, side by side on this CPU (optim.adam).

    python bench/optimizer_step.py           # ~1 minute on 2 cores

The pipeline's two hot loops at its sizes, as bench/cpu_isa.py times them: the pretrain step
(ResNet-18, 128 images of 32 px, forward + backward + Adam) and the decoder step (embedding 128,
LSTM 256, vocab 60, 128 packed captions). Each runs with both optimizers over the same model,
rounds alternating so that drift of the machine hits both alike. Prints the median seconds per
step and the ratio.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from cpu_isa import decoder_loop, pretrain_loop, seconds_per_step  # bench/ is on sys.path as the script's folder


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
                optimizer = torch.optim.Adam(parameters, lr=1e-3, fused=fused)
                seconds.append(seconds_per_step(loss, optimizer, args.steps))
        loop, fused = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {loop:.4f} | {fused:.4f} | {fused / loop:.2f}x |")
    print(f"\nmedian of {args.rounds} rounds of {args.steps} steps each")


if __name__ == "__main__":
    main()
