import math

import pytest
import torch
import torchvision

from captioning.accel import Runtime
from captioning.data import EpochBatchSampler, load_scaled
from captioning.images import Transform, scaled_side
from captioning.layout import read_split
from captioning.model import Captioner
from captioning.params import LR_SCHEDULES, ComputeParams, ModelParams, PretrainParams
from captioning.pretrain import ConceptTargets, build_concepts, caption_concepts, image_batches, pretrain_backbone

INLINE = Runtime(compute=ComputeParams(num_workers=0))


def test_concepts_are_content_words_and_adjacent_content_word_pairs():
    assert caption_concepts("A red circle, left of it.") == {"red", "circle", "left", "red circle", "circle left"}


def test_concepts_and_targets_come_from_the_train_captions(tiny_data):
    split = read_split(tiny_data, "train")
    concepts = build_concepts(split, max_concepts=50, min_images=3)
    assert len(concepts) == 50 and concepts[0] == "background"
    targets = ConceptTargets(split, split.images, concepts).targets
    assert targets.shape == (48, 50)
    captions = split.captions[split.images[0]["id"]]
    first = set().union(*map(caption_concepts, captions))
    assert {c for c, t in zip(concepts, targets[0]) if t} == first & set(concepts)
    for concept, target in zip(concepts, targets[0].tolist()):  # the share of captions naming it
        assert target == pytest.approx(sum(concept in caption_concepts(c) for c in captions) / len(captions))


def test_pretrain_changes_the_backbone_and_the_captioner_loads_it(tiny_data):
    split = read_split(tiny_data, "train")
    concepts = build_concepts(split, 100, 2)
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18()
    before = backbone.conv1.weight.clone()
    settings = PretrainParams(epochs=1, batch_size=16, lr=0.002, schedule="constant")
    summary = pretrain_backbone(backbone, split, concepts, settings, image_size=32, seed=0, runtime=INLINE,
                                log=lambda _: None)
    assert summary["pretrain_steps"] == 3 and summary["concepts"] == len(concepts)
    assert not torch.equal(before, backbone.conv1.weight)
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    model = Captioner.build(ModelParams(image_size=32, embed_size=8, hidden_size=8), 10, state)
    assert torch.equal(model.encoder.backbone[0].weight, backbone.conv1.weight)


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_every_schedule_pretrains_for_any_number_of_steps(tiny_data, schedule, steps):
    """One epoch of the 48 train images in `steps` batches (a 4-step one-cycle run once divided by zero)."""
    split = read_split(tiny_data, "train")
    torch.manual_seed(0)
    settings = PretrainParams(epochs=1, batch_size=math.ceil(48 / steps), lr=0.004, schedule=schedule)
    summary = pretrain_backbone(torchvision.models.resnet18(), split, build_concepts(split, 20, 2), settings,
                                image_size=32, seed=0, runtime=INLINE, log=lambda _: None)
    assert summary["pretrain_steps"] == steps and len(summary["curve"]) == steps
    assert summary["pretrain_loss"] == summary["pretrain_loss"]  # not NaN


def test_images_decoded_once_give_the_batches_the_workers_give(tiny_data):
    # The in-memory path is a speed-up only: same crops, flips and order as streaming.
    split = read_split(tiny_data, "train")
    paths = [split.image_path(r) for r in split.images]
    transform = Transform(32, random_crop=True, hflip=True)
    sampler = EpochBatchSampler(len(paths), 16, seed=3, epoch=1)
    streamed = list(image_batches(paths, transform, sampler, None, Runtime()))
    scaled = load_scaled(paths, 32, workers=1)
    assert scaled.dtype == torch.uint8 and scaled.shape == (48, 3, scaled_side(32), scaled_side(32))
    in_memory = list(image_batches(paths, transform, sampler, scaled, Runtime()))
    assert len(in_memory) == len(streamed) == 3
    for a, b in zip(in_memory, streamed):
        assert torch.equal(a, b)
