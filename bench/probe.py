"""How much of the synthetic scenes a backbone's pooled features hold: a probe.

    python bench/probe.py models/backbone.pt              # after `dvc repro pretrain`
    python bench/probe.py models/backbone.pt --image-size 48 --n-train 4000

Fits a linear classifier and a small MLP on the frozen features of `--n-train` train images to
predict which of the 12 (colour, shape) pairs a scene holds, and prints the share of val images
whose predicted set is exact, overall and by number of objects. That is the grounded score a
perfect decoder could reach on these features: when the captioner's grounded score is close to
it, the CNN is what limits the captions, not the LSTM. Needs the synthetic source (scenes) and
the resize stage's output; the scene labels are used here only, never in training.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from captioning import features
from captioning.datasets import read_split
from captioning.backbone import backbone_from_state, trunk
from captioning.params import load_params
from captioning.synthetic import COLOURS, SHAPES, scene_objects

PAIRS = [(c, s) for c in COLOURS for s in SHAPES]


def labelled(split, cnn, image_size: int, n: int):
    records = split.images[:n]
    pooled = features.extract(cnn, [split.image_path(r) for r in records], image_size=image_size,
                              device=torch.device("cpu"), views=1, hflip=False, seed=0, batch_size=128,
                              num_workers=1, bf16=False, desc="probe features")
    labels = [[float(p in scene_objects(r["scene"])) for p in PAIRS] for r in records]
    return torch.from_numpy(pooled[:, 0].astype(np.float32)), torch.tensor(labels), records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbone", help="backbone state_dict (the pretrain stage's output)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--images", default="data/resized", help="resized dataset (captions with scenes)")
    parser.add_argument("--image-size", type=int, help="network input side (default: model.image_size)")
    parser.add_argument("--n-train", type=int, default=4000)
    args = parser.parse_args()
    params = load_params(args.params)
    size = args.image_size or params.model.image_size
    cnn = trunk(backbone_from_state(params.model, torch.load(args.backbone, map_location="cpu", weights_only=True)))
    x_train, y_train, _ = labelled(read_split(args.images, "train"), cnn, size, args.n_train)
    x_val, y_val, records = labelled(read_split(args.images, "val"), cnn, size, 10**9)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    objects = torch.tensor([len(r["scene"]["objects"]) for r in records])
    for name, hidden in (("linear", 0), ("MLP 256", 256)):
        torch.manual_seed(0)
        width = x_train.size(1)
        head = (torch.nn.Linear(width, len(PAIRS)) if not hidden else
                torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, len(PAIRS))))
        optimizer = torch.optim.Adam(head.parameters(), 1e-3, weight_decay=1e-4)
        for _ in range(1500):
            batch = torch.randint(0, len(x_train), (256,))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            exact = ((head(x_val) > 0).float() == y_val).all(1).float()
        by_count = ", ".join(f"{k} objects {exact[objects == k].mean():.2f}" for k in (1, 2, 3) if (objects == k).any())
        print(f"{name} probe, {size} px: exact (colour, shape) set on {exact.mean():.3f} of val images ({by_count})")


if __name__ == "__main__":
    main()
