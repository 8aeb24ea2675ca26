"""weights stage: the backbone's ImageNet weights when model.pretrained is true (captioning.imagenet).

From model.weights_path (in inputs/model/), else the torch hub cache, else a verified, resumable
download into that cache (from data.base_url when it names a mirror). The file is refused unless
it holds model.backbone's weights. Writes a record of it (name and sha256, no machine's path),
which pretrain depends on and checks: it reruns exactly when the weights change.
"""

from __future__ import annotations

import argparse

from captioning import imagenet, sources
from captioning.backbone import load_weights
from captioning.params import check_inputs, load_params
from captioning.stage import run_stage

PARAMS = ("model.backbone", "model.pretrained", "model.weights_path", "model.weights_version", "data.base_url",
          "data.checksums")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params, PARAMS)
    model = params.model
    check_inputs({"model.weights_path": model.weights_path}, args.inputs)
    check_inputs({"data.checksums": params.data.checksums}, args.data_inputs)
    if not model.pretrained:
        imagenet.record(args.out, model.backbone, model.weights_version, "", None)
        print(f"weights: none (model.pretrained is false: the backbone starts from random weights) -> {args.out}")
        return
    path, origin = imagenet.obtain(model.backbone, model.weights_version, model.weights_path, params.data.base_url,
                                   sources.load_table(params.data.checksums))
    load_weights(path, model.backbone)  # refuses another architecture's file, naming both
    imagenet.record(args.out, model.backbone, model.weights_version, model.weights_path, path)
    print(f"weights: {model.backbone} {model.weights_version} ImageNet weights {path.name} from {origin} -> {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="JSON to write: the weights file's name and sha256")
    parser.add_argument("--inputs", required=True, help="folder holding the file model.weights_path names")
    parser.add_argument("--data-inputs", required=True, help="folder holding the file data.checksums names")
    run_stage("weights", main, parser.parse_args())
