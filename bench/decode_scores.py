"""Val scores of checkpoints at several beam sizes: does a model need beam search, judged off test.

    python bench/decode_scores.py --checkpoint models/ce.pt models/checkpoint.pt --beam 1 3
    python bench/decode_scores.py --checkpoint models/checkpoint.pt --beam 1 3 5 --length-penalty 0

Captions a split (val unless `--split`) with each checkpoint and beam size, as evaluate captions
test (`predict.caption_images`, beam search ranked by `--length-penalty`, evaluate's default), and
scores them the same way (`metrics.coco_scores`, and the scene scores where the split has scenes):
one markdown row per checkpoint and beam. In an experiment's outputs (`dvc exp apply NAME`),
models/ce.pt is train's cross-entropy checkpoint and models/checkpoint.pt the scst stage's.
"""

from __future__ import annotations

import argparse

import torch

from captioning import synthetic
from captioning.checkpoint import load_checkpoint
from captioning.errors import UserError
from captioning.layout import read_split
from captioning.metrics import coco_scores
from captioning.predict import Decoding, caption_images

COLUMNS = ("bleu_4", "cider", "grounded", "strict")


def scores(checkpoint: str, split, beams: list[int], length_penalty: float) -> list[dict]:
    """One row of scores per beam size for `checkpoint`'s captions of `split`'s images."""
    model, vocab, _ = load_checkpoint(checkpoint)
    records = split.captioned()
    rows = []
    for beam in beams:
        decoding = Decoding(beam, length_penalty, bf16=False)
        captions = caption_images(model, vocab, [split.image_path(r) for r in records], torch.device("cpu"),
                                  decoding, progress=False)
        hypotheses = {r["id"]: c for r, c in zip(records, captions)}
        row = coco_scores(split.captions, hypotheses)
        if synthetic.has_scenes(records):
            row |= synthetic.scene_scores(records, hypotheses)
        rows.append({"checkpoint": checkpoint, "decoding": decoding.describe(), **row})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True)
    parser.add_argument("--beam", type=int, nargs="+", default=[1, 3], help="beam sizes; 1 = greedy")
    parser.add_argument("--length-penalty", type=float, default=0.5)
    parser.add_argument("--data", default="data/resized", help="the resize stage's output")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    args = parser.parse_args(argv)
    try:
        split = read_split(args.data, args.split)
        rows = [row for path in args.checkpoint for row in scores(path, split, args.beam, args.length_penalty)]
    except UserError as err:
        raise SystemExit(f"decode_scores: {' '.join(str(err).split())}") from None
    shown = [c for c in COLUMNS if c in rows[0]]
    print(f"{args.split} split, {len(split.captioned())} images")
    print("| checkpoint | decoding | " + " | ".join(shown) + " |")
    print("|---|---|" + "---|" * len(shown))
    for row in rows:
        print(f"| {row['checkpoint']} | {row['decoding']} | " + " | ".join(f"{row[c]:.3f}" for c in shown) + " |")


if __name__ == "__main__":
    main()
