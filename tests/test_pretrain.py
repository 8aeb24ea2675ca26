import pytest
import torch
import torchvision

from captioning.datasets import read_split
from captioning.model import Captioner
from captioning.params import ModelParams
from captioning.pretrain import ConceptTargets, build_concepts, caption_concepts, pretrain_backbone


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
    summary = pretrain_backbone(backbone, split, concepts, image_size=32, epochs=1, batch_size=16,
                                lr=0.002, seed=0, device=torch.device("cpu"), log=lambda _: None)
    assert summary["pretrain_steps"] == 3 and summary["concepts"] == len(concepts)
    assert not torch.equal(before, backbone.conv1.weight)
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    model = Captioner.build(ModelParams(image_size=32, embed_size=8, hidden_size=8), 10, state)
    assert torch.equal(model.encoder.backbone[0].weight, backbone.conv1.weight)
