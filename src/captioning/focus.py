"""`caption-focus`: how focused a trained attention decoder is on a split's images.

    caption-focus --checkpoint models/checkpoint.pt --data data/resized     # the test split
    python -m captioning.focus --split val --words 20

For each word of its greedy captions: the largest weight over the grid's cells and the weights'
entropy, against an even share (1/P, ln P). Teacher forcing on a caption's own words retraces its
decoding (`Captioner.attention_maps`, as `caption --attention` draws it). Prints the means over all
words and, for the most frequent words, the mean largest weight: whether the decoder looks
somewhere for "red" or "circle" and spreads out for "a" or "and".
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from captioning.errors import UserError


@dataclass
class Focus:
    """Per word of the captions: its largest attention weight; per word in all: the entropy."""

    cells: int = 0  # P, the grid's cells
    largest: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    entropy: list[float] = field(default_factory=list)

    def words(self) -> int:
        return len(self.entropy)

    def mean_largest(self) -> float:
        return sum(w for ws in self.largest.values() for w in ws) / self.words()

    def mean_entropy(self) -> float:
        return sum(self.entropy) / self.words()


@torch.no_grad()
def measure(model, vocab, batches: Iterable[torch.Tensor]) -> Focus:
    """The attention of `model`'s greedy captions of each batch of images, (B, 3, H, W) each."""
    model.eval()
    focus = Focus()
    for images in batches:
        ids = model.generate(images, vocab.end_id, beam_size=1, length_penalty=0.0, bf16=False)  # (B, L)
        maps = model.attention_maps(images, ids).flatten(2)  # (B, L, P)
        focus.cells = maps.size(2)
        for row, weights in zip(ids.tolist(), maps):
            for t, token in enumerate(row):
                if token in (vocab.pad_id, vocab.start_id):
                    continue
                focus.largest[vocab.words[token]].append(float(weights[t].max()))
                focus.entropy.append(float(-(weights[t] * weights[t].clamp_min(1e-12).log()).sum()))
                if token == vocab.end_id:
                    break
    return focus


def report(focus: Focus, images: int, split: str, top: int) -> str:
    """The summary line, then a markdown table of the `top` most frequent words."""
    cells = focus.cells
    lines = [f"{images} {split} images, {focus.words()} words, {cells} cells: mean largest weight "
             f"{focus.mean_largest():.3f} (even share {1 / cells:.3f}), mean entropy {focus.mean_entropy():.3f} "
             f"(even: ln {cells} = {math.log(cells):.3f})",
             "", "| word | count | mean largest weight |", "|---|---|---|"]
    for word, weights in sorted(focus.largest.items(), key=lambda kv: -len(kv[1]))[:top]:
        lines.append(f"| {word} | {len(weights)} | {sum(weights) / len(weights):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="caption-focus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="models/checkpoint.pt")
    parser.add_argument("--data", default="data/resized", help="the resized dataset (the resize stage's output)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--words", type=int, default=12, help="most frequent words listed")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    from torch.utils.data import DataLoader

    from captioning.checkpoint import load_checkpoint
    from captioning.data import ImageDataset
    from captioning.images import Transform
    from captioning.layout import read_split

    try:
        model, vocab, _ = load_checkpoint(args.checkpoint)
        decoder = model.config.get("decoder", "lstm")
        if decoder != "attention":
            raise UserError(f"{args.checkpoint}: model.decoder is {decoder}; this needs a checkpoint trained with "
                            "model.decoder: attention")
        split = read_split(args.data, args.split)
    except UserError as err:
        raise SystemExit(f"caption-focus: {' '.join(str(err).split())}") from None
    if not split.images:
        raise SystemExit(f"caption-focus: {args.data}: the {args.split} split has no images")
    images = ImageDataset([split.image_path(r) for r in split.images], Transform(model.config["image_size"]))
    focus = measure(model, vocab, DataLoader(images, batch_size=args.batch_size))
    print(report(focus, len(split.images), args.split, args.words))


if __name__ == "__main__":
    main()
