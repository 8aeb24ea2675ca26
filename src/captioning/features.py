"""The frozen backbone's output, computed once per image: pooled vectors, or spatial grids for
the attention decoder.

The seed (like yunjey's tutorial) ran the frozen ResNet forward for every caption of every image
in every epoch, although its output never changes: on COCO ~5 captions x epochs times the CNN work
for nothing. The features stage runs the backbone once per image (eval mode, no grad, batched) and
stores its output as float16 `.npy` files, read back memory-mapped; training then costs the
encoder head and the decoder only.

Random crops are what caching changes: a cached feature is of one fixed crop. `views` > 1 stores
that many crops of each train image (view 0 the centre crop, the others random crops, flipped
when `hflip`), and training draws one view per image per epoch.

Layout: <folder>/<split>.npy, (N, views, F) pooled or (N, views, P, F) grids (P cells of the last
feature map, row-major) in float16, and <folder>/<split>.json (the image ids, in row order, plus
what the features were computed with). Grids are written batch by batch into the memory-mapped
file: COCO's train split at 224 px is 113k x 49 x 2048 values, 23 GB.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioning.accel import Runtime
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
def batches(backbone: torch.nn.Module, paths: list, crops: Views, *, seed: int, batch_size: int, runtime: Runtime,
            grid: bool = False, desc: str = "features") -> Iterator[np.ndarray]:
    """The backbone's float16 output for `crops` of each of `paths`, batch by batch: (b, views, F)
    pooled, or with `grid` (b, views, P, F). `backbone` is `backbone.trunk(resnet)`, for `grid`
    without its last layer (the average pool); run in eval mode, bf16 on CUDA when `compute.bf16`."""
    backbone = runtime.channels_last(backbone.eval().to(runtime.device))
    # Each image's crops are drawn from its own seed: the same with any number of workers.
    items = [(index, (seed * 1_000_003 + index) * 64) for index in range(len(paths))]
    loader = DataLoader(ImageDataset(paths, crops), batch_size=batch_size, sampler=items,
                        num_workers=runtime.compute.num_workers, pin_memory=runtime.pin_memory)
    for images in tqdm(loader, desc=desc, unit="batch"):
        b = images.size(0)
        images = runtime.channels_last(images.flatten(0, 1).to(runtime.device, non_blocking=True))
        with runtime.autocast():
            out = backbone(images)
        out = out.flatten(2).transpose(1, 2) if grid else out.flatten(1)  # (b*views, P, F) or (b*views, F)
        yield out.reshape(b, crops.views, *out.shape[1:]).to(torch.float16).cpu().numpy()


def extract(backbone: torch.nn.Module, paths: list, crops: Views, **settings) -> np.ndarray:
    """All of `batches(backbone, paths, crops, **settings)` in one array (for sizes that fit in memory)."""
    chunks = list(batches(backbone, paths, crops, **settings))
    return np.concatenate(chunks) if chunks else np.zeros((0, crops.views, 0), np.float16)


def write(folder: Path, split: str, ids: list[int], chunks: np.ndarray | Iterable[np.ndarray], meta: dict) -> None:
    """Write one split's features (an array, or its rows in chunks) into `folder`, chunk by chunk
    into a memory-mapped .npy (the caller makes the folder atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    chunks = [chunks] if isinstance(chunks, np.ndarray) else chunks
    out, row = None, 0
    for chunk in chunks:
        if out is None:
            out = np.lib.format.open_memmap(folder / f"{split}.npy", mode="w+", dtype=np.float16,
                                            shape=(len(ids), *chunk.shape[1:]))
        out[row:row + len(chunk)] = chunk
        row += len(chunk)
    if out is None:
        np.save(folder / f"{split}.npy", np.zeros((0, 1, 0), np.float16))
    else:
        out.flush()
        del out
    if row != len(ids):
        raise ValueError(f"{split}: {row} rows of features for {len(ids)} images")
    (folder / f"{split}.json").write_text(json.dumps({"ids": ids, **meta}))


def read(folder: str | Path, split: str, ids: list[int], feature_size: int, grid: bool = False) -> np.ndarray:
    """The (N, views, F) pooled features, or with `grid` the (N, views, P, F) grids, of `ids` (in
    that order), memory-mapped.

    Refuses features of other images, another backbone or the other kind: a stale cache must fail
    loudly, not train a model on the wrong vectors.
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
    if array.ndim != (4 if grid else 3):
        raise FeaturesError(f"{folder / split}.npy: {'pooled vectors' if array.ndim == 3 else 'grids'}, but "
                            f"model.decoder {'attention needs grids' if grid else 'lstm needs pooled vectors'}; "
                            "rerun the features stage (dvc repro features)")
    if array.shape[-1] != feature_size:
        raise FeaturesError(f"{folder / split}.npy: features of size {array.shape[-1]}, the model's backbone "
                            f"gives {feature_size}; rerun the features stage")
    return array
