"""Pooled backbone features, computed once per image while the backbone is frozen.

The seed (like yunjey's tutorial) ran the frozen ResNet forward for every caption of every image
in every epoch, although its output never changes: on COCO ~5 captions x epochs times the CNN work
for nothing. The features stage runs the backbone once per image (eval mode, no grad, batched) and
stores the pooled vectors as float16 `.npy` files, read back memory-mapped; training then costs
the encoder head and the decoder only.

Random crops are what caching changes: a cached feature is of one fixed crop. `views` > 1 stores
that many crops of each train image (view 0 the centre crop, the others random crops, flipped
when `hflip`), and training draws one view per image per epoch.

Layout: <folder>/<split>.npy (N, views, F) float16 and <folder>/<split>.json (the image ids, in
row order, plus what the features were computed with).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioning import accel
from captioning.data import ImageDataset
from captioning.errors import UserError
from captioning.images import Transform


class FeaturesError(UserError, ValueError):
    """Cached features that do not match the split or model they are used with."""


class Views:
    """Image -> (views, 3, S, S): the centre crop, then `views - 1` random crops (flipped when
    `hflip`) drawn from the item's rng."""

    def __init__(self, image_size: int, views: int, hflip: bool):
        self.views = views
        self.centre = Transform(image_size)
        self.random = Transform(image_size, random_crop=True, hflip=hflip)

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        return torch.stack([self.centre(image)] + [self.random(image, rng) for _ in range(1, self.views)])


@torch.no_grad()
def extract(backbone: torch.nn.Module, paths: list, *, image_size: int, device: torch.device,
            views: int, hflip: bool, seed: int, batch_size: int, num_workers: int, bf16: bool,
            desc: str = "features") -> np.ndarray:
    """(len(paths), views, F) float16 pooled features of `backbone` (a ResNet trunk ending in
    its average pool, e.g. `Encoder.backbone`), in eval mode; bf16 on CUDA when `bf16`."""
    backbone = accel.channels_last(backbone.eval().to(device), device)
    # Each image's crops are drawn from its own seed: the same with any number of workers.
    items = [(index, (seed * 1_000_003 + index) * 64) for index in range(len(paths))]
    loader = DataLoader(ImageDataset(paths, Views(image_size, views, hflip)), batch_size=batch_size,
                        sampler=items, num_workers=num_workers, pin_memory=device.type == "cuda")
    chunks = []
    for crops in tqdm(loader, desc=desc, unit="batch"):
        b = crops.size(0)
        images = accel.channels_last(crops.flatten(0, 1).to(device, non_blocking=True), device)
        with accel.autocast(device, bf16):
            pooled = backbone(images).flatten(1)
        chunks.append(pooled.view(b, views, -1).to(torch.float16).cpu())
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, views, 0), np.float16)


def write(folder: Path, split: str, ids: list[int], array: np.ndarray, meta: dict) -> None:
    """Write one split's features into `folder` (the caller makes the folder atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}.npy", array)
    (folder / f"{split}.json").write_text(json.dumps({"ids": ids, **meta}))


def read(folder: str | Path, split: str, ids: list[int], feature_size: int) -> np.ndarray:
    """The (N, views, F) features of `ids` (in that order), memory-mapped.

    Refuses features of other images or another backbone: a stale cache must fail loudly, not
    train a model on the wrong vectors.
    """
    folder = Path(folder)
    try:
        meta = json.loads((folder / f"{split}.json").read_text())
        array = np.load(folder / f"{split}.npy", mmap_mode="r")
    except FileNotFoundError as err:
        raise FeaturesError(f"{err.filename}: missing; run the features stage (dvc repro features)") from None
    if meta["ids"] != list(ids):
        raise FeaturesError(f"{folder / split}.json: features are of other images than the {split} split; "
                            "rerun the features stage (dvc repro features)")
    if array.shape[2] != feature_size:
        raise FeaturesError(f"{folder / split}.npy: features of size {array.shape[2]}, the model's backbone "
                            f"gives {feature_size}; rerun the features stage")
    return array
