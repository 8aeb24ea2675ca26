"""Torch datasets, the batch sampler and collate.

Training items are images (or their cached features), each with all of its captions: the CNN
then runs once per image per epoch (the seed ran it once per caption, ~5x the work for the same
gradient signal), and the decoder still sees every caption once per epoch. Captions are
tokenized once, up front.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from captioning.images import Scale, Transform, load_rgb
from captioning.layout import Split
from captioning.text import Vocabulary


# Arrays that fit in this many bytes are read (or decoded) into memory once; larger ones stream.
IN_MEMORY_BYTES = 4 << 30


class ImageDataset(Dataset):
    """Item -> transform(image): the one Dataset of image files.

    An item is an index (no augmentation: the transform gets no rng) or (index, item_seed),
    whose seed draws the item's augmentation.
    """

    def __init__(self, paths: list, transform: Callable[[Image.Image, random.Random | None], object]):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]):
        index, item_seed = item if isinstance(item, tuple) else (item, None)
        return self.input(index, None if item_seed is None else random.Random(item_seed))

    def input(self, index: int, rng: random.Random | None):
        return self.transform(load_rgb(self.paths[index]), rng)


class CaptionDataset(ImageDataset):
    """Item (index, item_seed) -> (image (3, S, S), [caption ids (L_i,), ...]).

    `captions_per_image` > 0 draws that many of the image's captions per item (by the item seed,
    so a new draw each epoch); 0 keeps them all.
    """

    def __init__(self, split: Split, vocab: Vocabulary, transform: Transform | None,
                 captions_per_image: int = 0):
        self.records = split.captioned()  # images without captions teach nothing
        super().__init__([split.image_path(r) for r in self.records], transform)
        self.captions = [[torch.tensor(vocab.encode(c)) for c in split.captions[r["id"]]]
                         for r in self.records]
        self.captions_per_image = captions_per_image  # 0 = all of them

    def __getitem__(self, item: tuple[int, int]):
        index, item_seed = item
        rng = random.Random(item_seed)
        return self.input(index, rng), self.pick_captions(index, rng)

    def pick_captions(self, index: int, rng: random.Random) -> list[torch.Tensor]:
        captions = self.captions[index]
        if 0 < self.captions_per_image < len(captions):
            captions = rng.sample(captions, self.captions_per_image)
        return captions


class FeatureDataset(CaptionDataset):
    """Item (index, item_seed) -> (cached feature, [caption ids, ...]) from cached features.

    `features` is the split's (N, views, ...) array (see `captioning.features`): pooled vectors
    (N, views, F) or spatial grids (N, views, P, F), rows in the order of `split.images`; each item
    draws one view by its seed, as a new crop would be drawn. Arrays up to `IN_MEMORY_BYTES` are
    read into memory once (COCO's 113k pooled x 2048 in float16: under 0.5 GB); larger ones (COCO's
    grids: 113k x 49 x 2048, 23 GB) stay memory-mapped and each item reads its own row.
    """

    def __init__(self, split: Split, vocab: Vocabulary, features, captions_per_image: int = 0):
        super().__init__(split, vocab, transform=None, captions_per_image=captions_per_image)
        row = {r["id"]: n for n, r in enumerate(split.images)}
        self.rows = [row[r["id"]] for r in self.records]
        if features.nbytes <= IN_MEMORY_BYTES:
            self.features, self.rows = features[self.rows], list(range(len(self.rows)))
        else:
            self.features = features

    def input(self, index: int, rng: random.Random) -> torch.Tensor:
        views = self.features.shape[1]
        view = rng.randrange(views) if views > 1 else 0
        return torch.from_numpy(np.asarray(self.features[self.rows[index], view], dtype=np.float32))


class EpochBatchSampler(Sampler):
    """Shuffled batches of (index, item_seed), a pure function of (seed, epoch).

    `start` skips batches already trained on, so a resumed epoch continues exactly where the
    interrupted one stopped. Under DistributedDataParallel each of `world` processes takes its
    share (`rank`) of every batch, so a step still covers `batch_size` images in all and the
    gradient (averaged by DDP) is that of the whole batch.

    Any dataset size works. BatchNorm's batch statistics need at least two images per process
    (`min_batch`), so a last batch smaller than that joins the batch before it (129 images in
    batches of 128: one batch of 129), and a dataset smaller than that is repeated within its one
    batch, each copy with its own item seed (so its own crop). A `batch_size` below `min_batch` is
    an error: the caller names the param.
    """

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed, self.epoch, self.start = size, batch_size, seed, epoch, start
        self.rank, self.world = rank, world
        self.min_batch = 2 * world
        if batch_size < self.min_batch:
            raise ValueError(f"a batch of {batch_size} images leaves fewer than 2 per process for BatchNorm "
                             f"({world} process{'es' if world > 1 else ''}): at least {self.min_batch} are needed")

    def batches(self) -> list[list[tuple[int, int]]]:
        if self.size == 0:
            return []
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        base = (self.seed * 100_003 + self.epoch) * 10_000_019
        items = [(i, base + i) for i in order]
        copies = 1
        while len(items) < self.min_batch:  # a tiny dataset: whole copies, each item with its own seed
            items += [(i, base + copies * self.size + i) for i in order]
            copies += 1
        batches = [items[k:k + self.batch_size] for k in range(0, len(items), self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < self.min_batch:
            last = batches.pop()
            batches[-1] = batches[-1] + last
        return [b[self.rank::self.world] for b in batches] if self.world > 1 else batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        yield from self.batches()[self.start:]

    def __len__(self) -> int:
        return max(0, len(self.batches()) - self.start)


def collate_captions(batch):
    """Stack images (or features); flatten, sort (longest first, as pack_padded_sequence wants) and pad captions.

    Returns images (B, 3, S, S), captions (N, L) padded with 0 (<pad>), lengths (N,) and
    image_index (N,): the row in `images` that caption n describes.
    """
    images = torch.stack([image for image, _ in batch])
    pairs = [(caption, b) for b, (_, captions) in enumerate(batch) for caption in captions]
    pairs.sort(key=lambda p: len(p[0]), reverse=True)
    lengths = torch.tensor([len(c) for c, _ in pairs])
    captions = torch.zeros(len(pairs), int(lengths[0]), dtype=torch.long)
    for n, (caption, _) in enumerate(pairs):
        captions[n, : len(caption)] = caption
    image_index = torch.tensor([b for _, b in pairs])
    return images, captions, lengths, image_index


def load_scaled(paths: list, image_size: int, workers: int = 0, desc: str = "decode") -> torch.Tensor:
    """Every image decoded and scaled once: (N, 3, side, side) uint8, in `paths` order.

    For loops that visit small images many times (pretraining at 32 px), where decoding a 256 px
    JPEG every epoch competes with the network's step for the same cores.
    """
    workers = workers or min(os.cpu_count() or 1, 8)
    loader = DataLoader(ImageDataset(paths, Scale(image_size)), batch_size=256, num_workers=workers)
    return torch.cat(list(tqdm(loader, desc=desc, unit="batch")))
