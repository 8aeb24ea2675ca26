"""download stage: build the train/val/test COCO-format dataset that `data.source` names."""

from __future__ import annotations

import argparse
import time

from captioning import datasets
from captioning.io import atomic_path
from captioning.params import load_params


def main(params_path: str, out: str) -> None:
    params = load_params(params_path)
    started = time.perf_counter()
    if params.data.source != "synthetic":
        raise SystemExit(f"data.source: {params.data.source!r} is not available yet; use synthetic")
    with atomic_path(out) as tmp:
        sizes = datasets.write_synthetic(tmp, params.data, params.seed)
    counts = ", ".join(f"{n} {split}" for split, n in sizes.items())
    print(f"download: {params.data.source} -> {out}: {counts} images "
          f"in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="dataset folder to create")
    args = parser.parse_args()
    main(args.params, args.out)
