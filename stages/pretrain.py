"""pretrain stage: teach the backbone to see, from the train captions (see captioning.pretrain)."""

from __future__ import annotations

import argparse

import torch

from captioning import accel
from captioning.backbone import recorded_weights, resnet
from captioning.io import atomic_path, write_csv_atomic, write_json_atomic
from captioning.layout import read_split
from captioning.params import load_params
from captioning.pretrain import build_concepts, pretrain_backbone
from captioning.stage import run_stage

PARAMS = ("seed", "pretrain", "model.backbone", "model.image_size", "compute")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params, PARAMS)
    torch.manual_seed(params.seed)
    runtime = accel.runtime(params.compute)
    backbone = resnet(params.model.backbone)
    imagenet = recorded_weights(args.weights, params.model.backbone)  # None unless model.pretrained
    if imagenet is not None:
        backbone.load_state_dict(imagenet)
    summary, curve = {"pretrain_epochs": params.pretrain.epochs}, []
    if params.pretrain.epochs:
        split = read_split(args.data, "train")
        concepts = build_concepts(split, params.pretrain.max_concepts, params.pretrain.min_images)
        summary |= pretrain_backbone(backbone, split, concepts, params.pretrain, image_size=params.model.image_size,
                                     seed=params.seed, runtime=runtime)
        curve = summary.pop("curve")
    # The head is task-specific; the captioner gets the feature layers only.
    state = {k: v.cpu() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    with atomic_path(args.out) as tmp:
        torch.save(state, tmp)
    seconds = summary.pop("pretrain_seconds", 0.0)  # wall time varies: printed, not a DVC metric
    write_json_atomic(args.metrics, summary)
    write_csv_atomic(args.plots, curve)
    print("pretrain: " + ", ".join(f"{k} {v}" for k, v in summary.items()) + f" in {seconds:.0f}s -> {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="dataset folder (captions and images)")
    parser.add_argument("--out", required=True, help="backbone state_dict to write")
    parser.add_argument("--metrics", required=True, help="pretrain summary JSON to write")
    parser.add_argument("--plots", required=True, help="CSV to write: the concept loss of every step")
    parser.add_argument("--weights", required=True, help="the weights stage's record of the ImageNet weights")
    run_stage("pretrain", main, parser.parse_args())
