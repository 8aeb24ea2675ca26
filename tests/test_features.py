"""The feature cache: what it stores, what it refuses, and that training from it is training from
the images it was computed on."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision

from captioning import data, features
from captioning.accel import Runtime
from captioning.backbone import trunk
from captioning.data import FeatureDataset
from captioning.images import Transform, load_rgb
from captioning.layout import Split, read_split
from captioning.model import Captioner
from captioning.params import ComputeParams, ModelParams, TrainParams
from captioning.text import Vocabulary
from captioning.training import Callbacks, fit, training_data

SIZE = 32
INLINE = Runtime(compute=ComputeParams(num_workers=0))  # tiny images: worker processes would only add start-up


def _cnn():
    torch.manual_seed(0)
    return trunk(torchvision.models.resnet18(weights=None)).eval()


def test_views_are_the_centre_crop_then_seeded_random_crops(tiny_data):
    split = read_split(tiny_data, "val")
    paths = [split.image_path(r) for r in split.images[:5]]
    cnn = _cnn()
    crops = features.Views(SIZE, views=3, hflip=False)
    array = features.extract(cnn, paths, crops, seed=1, batch_size=2, runtime=INLINE)
    assert array.shape == (5, 3, 512) and array.dtype == np.float16
    with torch.no_grad():
        centre = cnn(torch.stack([Transform(SIZE)(load_rgb(p)) for p in paths])).flatten(1)
    assert torch.allclose(torch.from_numpy(array[:, 0]).float(), centre, rtol=1e-2, atol=1e-3)
    assert not np.array_equal(array[:, 1], array[:, 0]) and not np.array_equal(array[:, 1], array[:, 2])
    again = features.extract(cnn, paths, crops, seed=1, batch_size=5, runtime=Runtime(compute=ComputeParams(num_workers=2)))
    assert np.array_equal(array, again)  # the same crops whatever the batch size and workers


def test_grids_are_written_in_chunks_memory_mapped_and_read_back_by_kind(tmp_path, monkeypatch):
    grids = np.random.default_rng(0).standard_normal((5, 2, 4, 8)).astype(np.float16)
    features.write(tmp_path, "train", [3, 1, 4, 5, 9], iter([grids[:2], grids[2:4], grids[4:]]), {"grid": True})
    back = features.read(tmp_path, "train", [3, 1, 4, 5, 9], 8, grid=True)
    assert isinstance(back, np.memmap) and np.array_equal(back, grids)
    with pytest.raises(features.FeaturesError, match="grids, but model.decoder lstm needs pooled vectors"):
        features.read(tmp_path, "train", [3, 1, 4, 5, 9], 8)
    with pytest.raises(ValueError, match="3 rows of features for 5 images"):
        features.write(tmp_path / "short", "train", [3, 1, 4, 5, 9], iter([grids[:3]]), {})
    # Past the in-memory limit the rows stay on disk, read one item at a time: the same values,
    # in the records' order, as when they fit in memory.

    split = Split([{"id": i, "file_name": f"{i}.jpg"} for i in (3, 1, 4, 5, 9)],
                  {i: ["a red circle"] for i in (3, 1, 4, 5, 9)}, tmp_path)
    vocab = Vocabulary.build(["a red circle"], 1)
    in_memory = FeatureDataset(split, vocab, back)
    monkeypatch.setattr(data, "IN_MEMORY_BYTES", 0)
    mapped = FeatureDataset(split, vocab, back)
    assert isinstance(mapped.features, np.memmap) and not isinstance(in_memory.features, np.memmap)
    for item in [(0, 11), (2, 12), (4, 13)]:
        assert torch.equal(mapped[item][0], in_memory[item][0])
        assert mapped[item][0].shape == (4, 8) and mapped[item][0].dtype == torch.float32


def test_read_refuses_features_of_other_images_or_backbone(tmp_path):
    features.write(tmp_path, "val", [1, 2], np.zeros((2, 1, 512), np.float16), {"backbone": "resnet18"})
    assert features.read(tmp_path, "val", [1, 2], 512).shape == (2, 1, 512)
    with pytest.raises(features.FeaturesError, match="other images"):
        features.read(tmp_path, "val", [2, 1], 512)
    with pytest.raises(features.FeaturesError, match="size 512.*2048"):
        features.read(tmp_path, "val", [1, 2], 2048)
    with pytest.raises(features.FeaturesError, match="test.json: missing; run the features stage"):
        features.read(tmp_path, "test", [1], 512)


@pytest.mark.parametrize("decoder, size", [("lstm", SIZE), ("attention", SIZE)])
def test_training_from_cached_features_matches_training_from_the_images(tiny_data, decoder, size):
    """With one centre-crop view, cached features are the images' backbone output (in float16):
    pooled vectors for the LSTM, 2 x 2 grids of layer3 for attention at 32 px. The same run from
    either input must end at the same validation loss."""
    train, val = read_split(tiny_data, "train"), read_split(tiny_data, "val")
    vocab = Vocabulary.build([c for cs in train.captions.values() for c in cs], 1)
    model_params = ModelParams(image_size=size, embed_size=16, hidden_size=24, train_backbone=False, decoder=decoder,
                               attention_size=8)
    params = TrainParams(epochs=2, batch_size=40, captions_per_image=0, random_crop=False, log_every=1)
    state = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()
             if not k.startswith("fc.")}

    def run(cached):
        torch.manual_seed(3)
        model = Captioner.build(model_params, len(vocab), state)
        data = training_data(vocab, train, val, size, params, cached)
        return fit(model, data, params, seed=5, runtime=INLINE, callbacks=Callbacks())

    cnn = Captioner.build(model_params, len(vocab), state).encoder.backbone
    cached = tuple(features.extract(cnn, [s.image_path(r) for r in s.images], features.Views(size, 1, False),
                                    seed=0, batch_size=16, runtime=INLINE, grid=decoder == "attention")
                   for s in (train, val))
    assert cached[1].shape == ((len(val.images), 1, 4, 256) if decoder == "attention" else (len(val.images), 1, 512))
    from_images, from_features = run(None), run(cached)
    assert from_features.steps == from_images.steps
    assert math.isclose(from_features.best["val_loss"], from_images.best["val_loss"], rel_tol=2e-3)


def test_cached_features_need_a_frozen_backbone(tiny_data):
    train = read_split(tiny_data, "train")
    vocab = Vocabulary.build([c for cs in train.captions.values() for c in cs], 1)
    model_params = ModelParams(image_size=SIZE, embed_size=16, hidden_size=24, train_backbone=True)
    model = Captioner.build(model_params, len(vocab), None)
    dummy = np.zeros((len(train.images), 1, 512), np.float16)
    with pytest.raises(ValueError, match="frozen backbone"):
        params = dataclasses.replace(TrainParams(), epochs=1)
        fit(model, training_data(vocab, train, train, SIZE, params, (dummy, dummy)), params, seed=0, runtime=INLINE,
            callbacks=Callbacks())
