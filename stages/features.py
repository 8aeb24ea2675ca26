"""features stage: the frozen backbone's output for every image, once (see captioning.features):
pooled vectors for the LSTM decoder, spatial grids for attention.

With `model.train_backbone: true` the features would be stale after the first step, so the stage
writes only a note and train reads the images.
"""

from __future__ import annotations

import argparse
import time

import torch

from captioning import accel, features
from captioning.backbone import backbone_from_state, grid_trunk, trunk
from captioning.io import atomic_path
from captioning.layout import SPLITS, read_split
from captioning.params import load_params
from captioning.stage import run_stage

PARAMS = ("seed", "features", "model.backbone", "model.image_size", "model.decoder", "model.grid_layer",
          "model.train_backbone", "train.hflip", "compute")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params, PARAMS)
    runtime = accel.runtime(params.compute)  # before any tensor work: it picks the CPU kernels
    started = time.perf_counter()
    with atomic_path(args.out) as tmp:
        tmp.mkdir(parents=True)
        if params.model.train_backbone:
            (tmp / "NOT_USED").write_text("model.train_backbone is true: train reads the images.\n")
            print(f"features: not needed (model.train_backbone is true) -> {args.out}")
            return
        state = torch.load(args.backbone, map_location="cpu", weights_only=True)
        grid = params.model.decoder == "attention"
        backbone = backbone_from_state(params.model, state)
        # as in model.Encoder: the grid is the map of model.grid_layer, else the pooled vector
        cnn = grid_trunk(backbone, params.model.grid_layer) if grid else trunk(backbone)
        settings = params.features
        total = 0
        for split in SPLITS:
            data = read_split(args.data, split)
            views = settings.views if split == "train" else 1  # evaluation sees the centre crop
            crops = features.Views(params.model.image_size, views, params.train.hflip)
            chunks = features.batches(cnn, [data.image_path(r) for r in data.images], crops, seed=params.seed,
                                      batch_size=settings.batch_size, runtime=runtime, grid=grid,
                                      desc=f"features {split}")
            meta = {"backbone": params.model.backbone, "image_size": params.model.image_size}
            if grid:
                meta.update(grid=True, grid_layer=params.model.grid_layer)
            features.write(tmp, split, [r["id"] for r in data.images], chunks, meta)
            total += len(data.images) * views
    seconds = time.perf_counter() - started
    print(f"features: {total} crops through {params.model.backbone} at {params.model.image_size}px "
          f"({'grids of ' + params.model.grid_layer if grid else 'pooled'}) "
          f"in {seconds:.1f}s ({total / seconds:.0f} img/s) -> {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="dataset folder (captions and images)")
    parser.add_argument("--backbone", required=True, help="backbone weights (pretrain's output)")
    parser.add_argument("--out", required=True, help="features folder to create")
    run_stage("features", main, parser.parse_args())
