"""How focused a trained attention decoder is: for each word of its captions of a split, the
largest weight over the grid's cells and the weights' entropy, against an even share (1/P, ln P).

    python bench/attention_focus.py --checkpoint models/checkpoint.pt --data data/resized   # seconds

The captions are greedy; teacher forcing on a caption's own words retraces its decoding
(`Captioner.attention_maps`, as `caption --attention` draws it). Prints the means over all words
and, for the most frequent words, the mean largest weight: whether the decoder looks somewhere
for "red" or "circle" and spreads out for "a" or "and".
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from captioning.checkpoint import load_checkpoint
from captioning.data import ImageDataset
from captioning.datasets import read_split
from captioning.images import Transform


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="models/checkpoint.pt")
    parser.add_argument("--data", default="data/resized")
    parser.add_argument("--split", default="test")
    parser.add_argument("--words", type=int, default=12, help="most frequent words listed")
    args = parser.parse_args()
    model, vocab, _ = load_checkpoint(args.checkpoint)
    if model.config["decoder"] != "attention":
        sys.exit(f"{args.checkpoint}: model.decoder is {model.config['decoder']}; this needs an attention checkpoint")
    model.eval()
    split = read_split(args.data, args.split)
    images = ImageDataset([split.image_path(r) for r in split.images], Transform(model.config["image_size"]))
    loader = DataLoader(images, batch_size=64)
    largest, entropy = defaultdict(list), []
    cells = 0
    for images in loader:
        ids = model.generate(images, vocab.end_id, beam_size=1, length_penalty=0.0, bf16=False)
        maps = model.attention_maps(images, ids).flatten(2)  # (B, L, P)
        cells = maps.size(2)
        for row, weights in zip(ids.tolist(), maps):
            for t, token in enumerate(row):
                if token in (vocab.pad_id, vocab.start_id):
                    continue
                largest[vocab.words[token]].append(float(weights[t].max()))
                entropy.append(float(-(weights[t] * weights[t].clamp_min(1e-12).log()).sum()))
                if token == vocab.end_id:
                    break
    every = [w for ws in largest.values() for w in ws]
    print(f"{len(split.images)} {args.split} images, {len(every)} words, {cells} cells: mean largest weight "
          f"{sum(every) / len(every):.3f} (even share {1 / cells:.3f}), mean entropy {sum(entropy) / len(entropy):.3f} "
          f"(even: ln {cells} = {math.log(cells):.3f})")
    print("\n| word | count | mean largest weight |\n|---|---|---|")
    for word, weights in sorted(largest.items(), key=lambda kv: -len(kv[1]))[: args.words]:
        print(f"| {word} | {len(weights)} | {sum(weights) / len(weights):.3f} |")


if __name__ == "__main__":
    main()
