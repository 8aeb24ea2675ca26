"""Image I/O: the parallel resize, and the one transform that train and eval share (the only place it lives).

Train and evaluation preprocessing come from here alone: yunjey's tutorial resized to 256 and
cropped 224 in training but fed 224 straight in sampling; a shared preset makes that impossible.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from captioning.errors import UserError

# torch is imported inside the few functions that make tensors: the resize stage and its worker
# processes never use it, and importing it costs each of them seconds of start-up.
if TYPE_CHECKING:
    import torch

# ImageNet statistics: the backbones were trained with them (and random ones do not mind).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# The network sees a crop of this fraction of the stored image (224 of 256, as in the seed).
CROP_FRACTION = 0.875


def load_rgb(path: str | Path, draft: int | None = None) -> Image.Image:
    """Decode any image mode to upright RGB (EXIF orientation applied).

    `draft` lets libjpeg decode a JPEG at a reduced scale no smaller than draft x draft: much
    faster for a big photo headed for a small size, and no loss once resized below that.
    """
    with Image.open(path) as image:
        if draft and image.format == "JPEG":
            image.draft("RGB", (draft, draft))
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I") or image.mode == "F":
            # 16-bit greyscale ("I;16", or "I" from older decoders): convert("RGB") would clip every
            # value above 255 to white, a silently wrong image. Scale 0..65535 down to 0..255.
            wide = np.asarray(image, dtype=np.float64)
            if image.mode == "F" and wide.max(initial=0) <= 1.0:
                wide = wide * 65535  # float images in [0, 1]
            grey = np.clip(wide / 257.0, 0, 255).round().astype(np.uint8)
            return Image.fromarray(grey, mode="L").convert("RGB")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Composite on white: dropping alpha would expose arbitrary colours in transparent pixels.
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        return image.convert("RGB")


class BadImageError(UserError, ValueError):
    """An image file that cannot be used; the message names the file, `kind` says what is wrong
    ("missing file", "empty file", ...) and `reason` adds the decoder's words, if any."""

    def __init__(self, path, kind: str, detail: str = ""):
        # The real path: the pipeline reads images through links, the user knows the file.
        path = os.path.realpath(path)
        self.path, self.kind, self.detail = str(path), kind, detail
        self.reason = f"{kind} ({detail})" if detail else kind
        super().__init__(f"{path}: {self.reason}")

    def __reduce__(self):  # raised in worker processes: must survive pickling with every field
        return (BadImageError, (self.path, self.kind, self.detail))


def resize_one(src: Path, dst: Path, size: int, quality: int) -> None:
    """Resize `src` to size x size (aspect not kept, as in Show and Tell) and save a JPEG."""
    try:
        image = load_rgb(src, draft=size * 2)
    except FileNotFoundError:
        raise BadImageError(src, "missing file") from None
    except Image.DecompressionBombError as err:
        # Pillow refuses images over 2 x MAX_IMAGE_PIXELS (~179 Mpx): decoding one could exhaust memory.
        raise BadImageError(src, "too large to decode safely", str(err)) from None
    except UnidentifiedImageError:
        reason = "empty file" if src.stat().st_size == 0 else "not an image Pillow can read"
        raise BadImageError(src, reason) from None
    except (OSError, SyntaxError, ValueError) as err:
        # Raised in a worker process: without the path the user could not find the file.
        raise BadImageError(src, "truncated or corrupt", str(err)) from None
    image = image.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    dst.parent.mkdir(parents=True, exist_ok=True)
    image.save(dst, format="JPEG", quality=quality)


def _resize_pair(pair: tuple[Path, Path], size: int, quality: int, skip_bad: bool) -> BadImageError | None:
    try:
        resize_one(pair[0], pair[1], size, quality)
    except BadImageError as err:
        if not skip_bad:
            raise
        return err
    return None


def resize_all(pairs: list[tuple[Path, Path]], size: int, quality: int, workers: int = 0,
               desc: str = "resize", skip_bad: bool = False) -> dict[int, BadImageError]:
    """Resize every (src, dst) pair in parallel over `workers` processes (0 = one per core).

    A bad image raises BadImageError naming it, or with `skip_bad` is left out: the return value
    maps the index of each skipped pair to its error.
    """
    workers = workers or os.cpu_count() or 1
    job = partial(_resize_pair, size=size, quality=quality, skip_bad=skip_bad)
    if workers == 1:
        errors = [job(pair) for pair in tqdm(pairs, desc=desc, unit="img")]
    else:
        with ProcessPoolExecutor(workers) as pool:
            errors = list(tqdm(pool.map(job, pairs, chunksize=16), total=len(pairs), desc=desc, unit="img"))
    return {i: error for i, error in enumerate(errors) if error is not None}


class Transform:
    """Scale to image_size / CROP_FRACTION, crop image_size (random or centre), maybe flip.

    `Transform(image_size)` is evaluation's preprocessing (centre crop, no flip); training turns
    on `random_crop` and `hflip`. One class, so train and eval cannot drift apart. Randomness comes
    from the `rng` passed per call, never from a global generator, so an item's augmentation
    depends only on (seed, epoch, item): the same with any number of DataLoader workers and the
    same after a resume mid-epoch.
    """

    def __init__(self, image_size: int, *, random_crop: bool = False, hflip: bool = False):
        self.image_size, self.random_crop, self.hflip = image_size, random_crop, hflip

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return normalize(self.crop(scale(image, self.image_size), rng))

    def crop(self, scaled: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        """(3, side, side) uint8 from `scale` -> (3, S, S) uint8: the crop and flip alone, so a
        loop over images scaled once (`load_scaled`) augments exactly as __call__ does."""
        if (self.random_crop or self.hflip) and rng is None:
            raise ValueError("a random crop or flip needs the item's rng")
        size = self.image_size
        slack = scaled.size(-1) - size
        left, top = (rng.randint(0, slack), rng.randint(0, slack)) if self.random_crop else (slack // 2,) * 2
        crop = scaled[:, top:top + size, left:left + size]
        if self.hflip and rng.random() < 0.5:
            crop = crop.flip(-1)
        return crop


class Scale:
    """`scale` as a picklable transform (DataLoader workers): image -> (3, side, side) uint8."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return scale(image, self.image_size)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float, ImageNet-normalised; one image or a batch."""
    from torchvision.transforms.functional import normalize as tv_normalize

    return tv_normalize(pixels.float().div_(255), MEAN, STD)


def scale(image: Image.Image, image_size: int) -> torch.Tensor:
    """RGB PIL image -> (3, side, side) uint8 at the side the network's crops are taken from."""
    from torchvision.transforms.functional import pil_to_tensor

    side = scaled_side(image_size)
    return pil_to_tensor(image.resize((side, side), Image.Resampling.BILINEAR))


def scaled_side(image_size: int) -> int:
    return round(image_size / CROP_FRACTION)
