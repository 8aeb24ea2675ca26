"""resize stage: every split's images to resize.side x resize.side RGB JPEGs, in parallel.

This is where every image is decoded, so this is where bad images are met. With
`data.on_bad_image: error` the first one stops the stage, naming the file; with `skip` it is left
out and listed with its reason in `<out>/bad_images.json`. Either way the stage writes
`<out>/<split>/captions.json` holding exactly the images it wrote (and that have a caption), which
vocab, train and evaluate read: a skipped image can never reach a DataLoader worker.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from captioning.images import BadImageError, resize_all
from captioning.io import atomic_path, read_json, write_json_atomic
from captioning.layout import (SPLITS, DatasetError, captions_path, check_links, coco_captions, images_dir,
                               read_split)
from captioning.params import load_params
from captioning.stage import run_stage

PARAMS = ("resize", "data.on_bad_image")


def main(params_path: str, data: str, out: str) -> None:
    all_params = load_params(params_path, PARAMS)
    params, policy = all_params.resize, all_params.data.on_bad_image
    started = time.perf_counter()
    check_links(data)
    total, reasons = 0, Counter()
    report = {"on_bad_image": policy, "counts": {}, "skipped": {}, "without_caption": {}, "empty_captions": {}}
    for split in SPLITS:
        raw = read_split(data, split)
        # Images without a caption teach and score nothing: left out here, and counted.
        records = raw.captioned()
        # Each split is a DVC output of its own (its md5 in dvc.lock is the split's digest in MLflow);
        # `tmp` is the split's folder, so the layout's paths take the split "" below it.
        with atomic_path(Path(out) / split) as tmp:
            pairs = [(images_dir(data, split) / r["file_name"], images_dir(tmp, "") / r["file_name"])
                     for r in records]
            images_dir(tmp, "").mkdir(parents=True)
            try:
                bad = resize_all(pairs, params.side, params.quality, params.workers, desc=f"resize {split}",
                                 skip_bad=policy == "skip")
            except BadImageError as err:
                raise DatasetError(f"{err}. Fix or remove the file, or set data.on_bad_image: skip to leave such "
                                   f"images out (they are listed in {Path(out) / 'bad_images.json'})") from None
            kept = [r for i, r in enumerate(records) if i not in bad]
            info = read_json(captions_path(data, split)).get("info", {})
            doc = coco_captions(kept, raw.captions, info.get("description", split))
            captions_path(tmp, "").write_text(json.dumps(doc, separators=(",", ":")))
        report["skipped"][split] = [{"file_name": records[i]["file_name"], "id": records[i]["id"],
                                     "reason": bad[i].reason} for i in sorted(bad)]
        reasons.update(error.kind for error in bad.values())
        report["without_caption"][split] = len(raw.images) - len(records)
        report["empty_captions"][split] = raw.empty_captions
        total += len(kept)
    report["counts"] = dict(sorted(reasons.items()))
    write_json_atomic(Path(out) / "bad_images.json", report)
    seconds = time.perf_counter() - started
    skipped = sum(reasons.values())
    note = f"; skipped {skipped} bad images ({_counts(reasons)}), listed in {Path(out) / 'bad_images.json'}" if skipped else ""
    print(f"resize: {total} images to {params.side}x{params.side} in {seconds:.1f}s "
          f"({total / seconds:.0f} img/s) -> {Path(out)}{note}")


def _counts(counter: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counter.most_common())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="dataset folder (download's output)")
    parser.add_argument("--out", required=True, help="folder of resized images (and their captions) to create")
    args = parser.parse_args()
    run_stage("resize", main, args.params, args.data, args.out)
