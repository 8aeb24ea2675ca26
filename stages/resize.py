"""resize stage: every split's images to resize.size x resize.size RGB JPEGs, in parallel."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from captioning.datasets import SPLITS, images_dir, read_split
from captioning.images import resize_all
from captioning.io import atomic_path
from captioning.params import load_params


def main(params_path: str, data: str, out: str) -> None:
    params = load_params(params_path).resize
    started = time.perf_counter()
    total = 0
    with atomic_path(out) as tmp:
        for split in SPLITS:
            records = read_split(data, split).images
            pairs = [(images_dir(data, split) / r["file_name"], images_dir(tmp, split) / r["file_name"])
                     for r in records]
            images_dir(tmp, split).mkdir(parents=True)
            resize_all(pairs, params.size, params.quality, params.workers, desc=f"resize {split}")
            total += len(pairs)
    seconds = time.perf_counter() - started
    print(f"resize: {total} images to {params.size}x{params.size} in {seconds:.1f}s "
          f"({total / seconds:.0f} img/s) -> {Path(out)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="dataset folder (download's output)")
    parser.add_argument("--out", required=True, help="folder of resized images to create")
    args = parser.parse_args()
    main(args.params, args.data, args.out)
