"""Visual-concept pretraining of the backbone from the captions alone.

Offline there are no ImageNet weights, and a Show-and-Tell model trained from scratch learns to
see very slowly: the image reaches the LSTM only as its first input, so early on the decoder
learns the language and ignores a CNN that has not learnt anything yet (docs/results.md, "Why a
pretrain stage"). Teaching the CNN first to predict which words and word pairs ("red", "red
circle", "left of") occur in an image's captions, as in Fang et al. 2015 ("From captions to
visual concepts and back"), breaks that deadlock. It needs no labels beyond the
captions, so it works the same on COCO; with ImageNet weights it fine-tunes them, or is skipped.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter

import torch
from torch import nn
from torch.utils.data import DataLoader

from captioning.accel import Runtime
from captioning.data import IN_MEMORY_BYTES, EpochBatchSampler, ImageDataset, load_scaled
from captioning.images import Transform, normalize, scaled_side
from captioning.layout import Split
from captioning.optim import TrainingStep, adam, lr_schedule
from captioning.params import PretrainParams
from captioning.text import tokenize


# Function words say nothing about the image ("a picture of", "there is"), yet as targets they
# are coin flips that drown the visual signal in noise; they are not concepts.
STOPWORDS = frozenset("""a an the of on in at to into onto with without and or but is are was were be
been being there here this that these those it its it's as by for from some any""".split())


def caption_concepts(caption: str) -> set[str]:
    """Content words of a caption and its adjacent pairs of content words ("red circle")."""
    words = tokenize(caption)
    pairs = {f"{a} {b}" for a, b in zip(words, words[1:]) if a not in STOPWORDS and b not in STOPWORDS}
    return {w for w in words if w not in STOPWORDS} | pairs


def build_concepts(split: Split, max_concepts: int, min_images: int) -> list[str]:
    """The concepts found in at least `min_images` images, most frequent first (at most max_concepts)."""
    counts = Counter()
    for captions in split.captions.values():
        counts.update(set().union(*map(caption_concepts, captions)) if captions else set())
    kept = sorted((c for c, n in counts.items() if n >= min_images), key=lambda c: (-counts[c], c))
    return kept[:max_concepts]


class ConceptTargets:
    """Image index -> (K,) share of the image's captions that contain each concept.

    A share rather than "any caption": annotators pick among synonyms ("circle", "disk", "ball")
    and optional details, so presence in any one of five captions is a noisy label, while the
    share is the probability that a caption of this image names the concept.
    """

    def __init__(self, split: Split, records: list[dict], concepts: list[str]):
        index = {c: i for i, c in enumerate(concepts)}
        self.targets = torch.zeros(len(records), len(concepts))
        for n, record in enumerate(records):
            captions = split.captions[record["id"]]
            for caption in captions:
                for concept in caption_concepts(caption):
                    if concept in index:
                        self.targets[n, index[concept]] += 1.0 / len(captions)


def image_batches(paths: list, transform: Transform, sampler: EpochBatchSampler, scaled: torch.Tensor | None,
                  runtime: Runtime):
    """The epoch's augmented image batches, in `sampler` order: cropped from `scaled` (the images
    decoded once) when given, else decoded by DataLoader workers. Both give identical tensors."""
    if scaled is None:
        yield from DataLoader(ImageDataset(paths, transform), batch_sampler=sampler,
                              num_workers=runtime.compute.num_workers, pin_memory=runtime.pin_memory)
        return
    for batch in sampler.batches():
        yield normalize(torch.stack([transform.crop(scaled[i], random.Random(s)) for i, s in batch]))


def pretrain_backbone(backbone: nn.Module, split: Split, concepts: list[str], settings: PretrainParams, *,
                      image_size: int, seed: int, runtime: Runtime, log=print) -> dict:
    """Train `backbone` (a torchvision ResNet; its fc is replaced) to predict caption concepts.

    Returns a summary (final loss, steps, seconds) and under "curve" the loss of every step, as
    rows of step, epoch and loss. The backbone is left in place, trained.
    """
    records = split.captioned()
    paths = [split.image_path(r) for r in records]
    transform = Transform(image_size, random_crop=True)
    # Small images (the synthetic data at 32 px) are decoded once and kept; COCO at 224 px streams.
    in_memory = len(paths) * 3 * scaled_side(image_size) ** 2 <= IN_MEMORY_BYTES
    scaled = load_scaled(paths, image_size, desc="pretrain: decode once") if in_memory else None
    targets = ConceptTargets(split, records, concepts).targets.to(runtime.device)
    backbone.fc = nn.Linear(backbone.fc.in_features, len(concepts))
    backbone = runtime.channels_last(backbone.to(runtime.device)).train()
    optimizer = adam(backbone.parameters(), settings.lr, runtime.device)
    steps_per_epoch = len(EpochBatchSampler(len(paths), settings.batch_size, seed + 1, 0))
    step = TrainingStep(optimizer, lr_schedule(optimizer, settings.schedule, settings.lr,
                                               settings.epochs * steps_per_epoch), runtime)
    criterion = nn.BCEWithLogitsLoss()
    started, curve, last = time.perf_counter(), [], math.nan
    for epoch in range(settings.epochs):
        sampler = EpochBatchSampler(len(paths), settings.batch_size, seed + 1, epoch)
        losses = []  # on the device: reading each one at once would sync with the GPU every step
        for batch, images in zip(sampler.batches(), image_batches(paths, transform, sampler, scaled, runtime)):
            images = runtime.channels_last(images.to(runtime.device, non_blocking=True))
            wanted = targets[torch.tensor([i for i, _ in batch], device=runtime.device)]
            losses.append(step(lambda: (criterion(backbone(images).float(), wanted),) * 2))
        curve += [{"step": len(curve) + i + 1, "epoch": epoch + 1, "loss": value}
                  for i, value in enumerate(torch.stack(losses).float().cpu().tolist())] if losses else []
        last = curve[-1]["loss"] if curve else math.nan
        log(f"pretrain epoch {epoch + 1}/{settings.epochs}: concept loss {last:.4f}")
    return {"pretrain_loss": last, "pretrain_steps": len(curve),
            "pretrain_seconds": round(time.perf_counter() - started, 1), "concepts": len(concepts), "curve": curve}
