"""The attention decoder's training step: every caption run to the batch's longest against each
caption run only for its own steps (`AttentionDecoder.forward`, packed as the LSTM's), side by side.

    python bench/attention_step.py           # ~1 minute on 2 cores

At the pipeline's sizes: embedding 128, LSTMCell 256, attention 128, vocab 60, the default grid
(2 x 2 cells of ResNet-18's layer3, 256 values) and 128 captions a step whose lengths are spread as
the synthetic captions' (mean ~12 tokens, the longest of a batch ~22). "Padded" is the decoder as
it was: `attend` over every step for every caption, then the padding dropped. Both run the same
model on the same batch, rounds alternating so that drift of the machine hits both alike; the LSTM
decoder's step (bench/cpu_isa.py's, on the same lengths) is timed beside them. Prints the median
seconds per step and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from cpu_isa import seconds_per_step  # bench/ is on sys.path as the script's folder
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from captioning.model import AttentionDecoder, Decoder
from captioning.optim import adam

VOCAB, CAPTIONS, CELLS, CELL = 60, 128, 4, 256


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grids, captions and lengths (longest first) of one step."""
    lengths = (torch.randn(CAPTIONS) * 3.5 + 12).round().clamp(6, 24).long().sort(descending=True).values
    captions = torch.randint(3, VOCAB, (CAPTIONS, int(lengths[0]))) * (torch.arange(int(lengths[0])) < lengths[:, None])
    return torch.randn(CAPTIONS, CELLS, CELL), captions, lengths


def padded(decoder: AttentionDecoder, grid, captions, lengths):
    """Every caption to the longest, the padding dropped after: the decoder's forward as it was."""
    logits, alphas = decoder.attend(grid, captions)
    mask = (torch.arange(captions.size(1)) < lengths[:, None]).unsqueeze(2)
    per_cell = (alphas * mask).sum(1)
    regulariser = ((per_cell - lengths[:, None] / CELLS) ** 2).mean()
    return pack_padded_sequence(logits, lengths, batch_first=True).data, regulariser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    args = parser.parse_args()
    torch.manual_seed(0)
    grid, captions, lengths = batch()
    targets = pack_padded_sequence(captions, lengths, batch_first=True).data
    attention, lstm = AttentionDecoder(CELL, 128, 256, 128, VOCAB, 20), Decoder(128, 256, VOCAB, 1, 20)
    pooled = torch.randn(CAPTIONS, 128)

    def loss(forward):
        def value():
            logits, regulariser = forward()
            cross_entropy = nn.functional.cross_entropy(logits, targets)
            return cross_entropy if regulariser is None else cross_entropy + regulariser
        return value

    variants = {
        "attention, all to the longest step": (attention, loss(lambda: padded(attention, grid, captions, lengths))),
        "attention, each caption its own steps": (attention, loss(lambda: attention(grid, captions, lengths))),
        "LSTM (packed)": (lstm, loss(lambda: lstm(pooled, captions, lengths))),
    }
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (model, step_loss) in variants.items():
            times[name].append(seconds_per_step(step_loss, adam(list(model.parameters()), 1e-3, torch.device("cpu")),
                                                args.steps))
    print(f"{torch.get_num_threads()} threads; {CAPTIONS} captions of mean length {lengths.float().mean():.1f}, "
          f"longest {int(lengths[0])}\n")
    print("| step | s/step | / LSTM |\n|---|---|---|")
    base = statistics.median(times["LSTM (packed)"])
    for name, seconds in times.items():
        print(f"| {name} | {statistics.median(seconds):.4f} | {statistics.median(seconds) / base:.2f}x |")
    first, second = (statistics.median(times[name]) for name in list(variants)[:2])
    print(f"\nown steps / to the longest: {second / first:.2f}x; median of {args.rounds} rounds of {args.steps} steps")


if __name__ == "__main__":
    main()
