"""vocab stage: words seen at least `vocab.threshold` times in the train captions, as JSON."""

from __future__ import annotations

import argparse

from captioning.layout import read_split
from captioning.params import load_params
from captioning.stage import run_stage
from captioning.text import Vocabulary, tokenize

PARAMS = ("vocab",)


def main(params_path: str, data: str, out: str) -> None:
    params = load_params(params_path, PARAMS).vocab
    split = read_split(data, "train")
    captions = [c for caps in split.captions.values() for c in caps]
    without = sum(not caps for caps in split.captions.values())
    if split.empty_captions or without:
        print(f"vocab: skipped {split.empty_captions} empty captions; {without} train images have no caption")
    vocab = Vocabulary.build(captions, params.threshold)
    vocab.save(out)
    tokens = [t for c in captions for t in tokenize(c)]
    unknown = sum(t not in vocab.index for t in tokens)
    print(f"vocab: {len(vocab)} words (threshold {params.threshold}) from {len(captions)} train "
          f"captions; {unknown / max(len(tokens), 1):.2%} of tokens become <unk> -> {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="dataset folder: captions of the images kept (resize's output)")
    parser.add_argument("--out", required=True, help="vocabulary JSON to write")
    args = parser.parse_args()
    run_stage("vocab", main, args.params, args.data, args.out)
