"""download stage: build the train/val/test COCO-format dataset that `data.source` names.

`synthetic` is generated; coco2014/coco2017 download the official archives (and Karpathy's split)
into the download cache; flickr8k/flickr30k/local read the user's folder. See captioning.sources.
"""

from __future__ import annotations

import argparse
import time

from captioning import sources, synthetic
from captioning.io import atomic_path, write_json_atomic
from captioning.params import check_inputs, load_params
from captioning.stage import run_stage

PARAMS = ("seed", "data")


def main(params_path: str, out: str, downloads: str, summary: str, inputs: str) -> None:
    params = load_params(params_path, PARAMS)
    data = params.data
    check_inputs({"data.annotations": data.annotations, "data.karpathy_json": data.karpathy_json,
                  "data.checksums": data.checksums}, inputs)
    started = time.perf_counter()
    if params.data.source == "synthetic":
        with atomic_path(out) as tmp:
            sizes = synthetic.write_dataset(tmp, params.data, params.seed)
        note, missing = "", 0
    else:
        dataset = sources.build(params.data, params.seed, downloads)
        with atomic_path(out) as tmp:
            sources.write(tmp, dataset)
        sizes = dataset.manifest["images"]
        missing = dataset.manifest["missing_images"]
        note = f"; {missing} listed images are missing (resize will skip and report them)" if missing else ""
    write_json_atomic(summary, {"source": params.data.source, "images": sizes,
                                "missing_images": missing})
    counts = ", ".join(f"{n} {split}" for split, n in sizes.items())
    print(f"download: {params.data.source} -> {out}: {counts} images "
          f"in {time.perf_counter() - started:.1f}s{note}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="dataset folder to create")
    parser.add_argument("--downloads", default="data/downloads",
                        help="download cache (archives and extracted images; not a DVC output)")
    parser.add_argument("--summary", required=True, help="JSON to write: source and images per split")
    parser.add_argument("--inputs", required=True, help="folder holding the files data.* params name")
    args = parser.parse_args()
    run_stage("download", main, args.params, args.out, args.downloads, args.summary, args.inputs)
