"""Caption images with a trained captioner: batched greedy decoding over a DataLoader."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioning.data import ImageDataset
from captioning.images import EvalTransform
from captioning.model import Captioner
from captioning.text import Vocabulary


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@torch.no_grad()
def caption_images(model: Captioner, vocab: Vocabulary, paths: list, device: torch.device,
                   batch_size: int = 64, num_workers: int = 0, progress: bool = True) -> list[str]:
    """One greedy caption per image path, in order."""
    model.eval().to(device)
    dataset = ImageDataset(paths, EvalTransform(model.config["image_size"]))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    captions: list[str] = [""] * len(dataset)
    for images, index in tqdm(loader, desc="caption", unit="batch", disable=not progress):
        ids = model.caption_ids(images.to(device, non_blocking=True), vocab.end_id).cpu()
        for row, i in zip(ids.tolist(), index.tolist()):
            captions[i] = vocab.decode(row)
    return captions
