"""Datasets of any size: every compute step works from a 1-image train split up, including sizes
that leave one image in the last batch (BatchNorm cannot normalise a batch of one: see
`data.EpochBatchSampler`), in one process and in two gloo processes."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from captioning import features
from captioning.accel import Runtime, World
from captioning.backbone import resnet
from captioning.layout import Split, read_split
from captioning.model import Captioner
from captioning.params import ComputeParams, DataParams, ModelParams, PretrainParams, TrainParams
from captioning.predict import Decoding, caption_images
from captioning.pretrain import build_concepts, pretrain_backbone
from captioning.synthetic import write_dataset
from captioning.text import Vocabulary
from captioning.training import Callbacks, fit, training_data

SIZE = 32
MODEL = ModelParams(image_size=SIZE, embed_size=16, hidden_size=24, train_backbone=False)
# 128 images a step, as the default: 129 images leave one for a last batch
TRAIN = TrainParams(epochs=1, batch_size=128, captions_per_image=1, log_every=1000)
CPU = torch.device("cpu")
INLINE = Runtime(compute=ComputeParams(num_workers=0))


@pytest.fixture(scope="module")
def data_129(tmp_path_factory):
    out = tmp_path_factory.mktemp("sizes") / "raw"
    write_dataset(out, dataclasses.replace(DataParams(), num_train=129, num_val=3, num_test=1, min_side=64,
                                           max_side=80, workers=2), seed=3)
    train = read_split(out, "train")
    return train, read_split(out, "val"), Vocabulary.build([c for cs in train.captions.values() for c in cs], 1)


def _first(split: Split, n: int) -> Split:
    images = split.images[:n]
    return dataclasses.replace(split, images=images, captions={r["id"]: split.captions[r["id"]] for r in images})


def _cached(model: Captioner, *splits: Split):
    return tuple(features.extract(model.encoder.backbone, [s.image_path(r) for r in s.images],
                                  features.Views(SIZE, 1, False), seed=0, batch_size=64, runtime=INLINE)
                 for s in splits)


@pytest.mark.parametrize("n", [1, 2, 3, 129])
def test_pretrain_features_train_and_caption_from_one_image_up(data_129, n):
    full, val, vocab = data_129
    train = _first(full, n)
    torch.manual_seed(0)
    backbone = resnet("resnet18")
    settings = PretrainParams(epochs=1, batch_size=128, lr=0.002, schedule="onecycle")
    summary = pretrain_backbone(backbone, train, build_concepts(train, 50, 1), settings, image_size=SIZE, seed=0,
                                runtime=INLINE, log=lambda _: None)
    assert summary["pretrain_steps"] == 1  # 129 = one batch of 129, not 128 + 1
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    model = Captioner.build(MODEL, len(vocab), state)
    result = fit(model, training_data(vocab, train, val, SIZE, TRAIN, _cached(model, train, val)), TRAIN, seed=0,
                 runtime=INLINE, callbacks=Callbacks())
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.final_train_loss))
    from_images = Captioner.build(dataclasses.replace(MODEL, train_backbone=True), len(vocab), state)
    result = fit(from_images, training_data(vocab, train, val, SIZE, TRAIN), TRAIN, seed=0, runtime=INLINE,
                 callbacks=Callbacks())
    assert result.steps == 1
    greedy = Decoding(beam_size=1, length_penalty=0.0, bf16=False)
    assert len(caption_images(model, vocab, [train.image_path(train.images[0])], CPU, greedy, progress=False)) == 1


def test_a_step_of_one_image_is_refused_naming_the_param(data_129):
    train, val, vocab = data_129
    params = dataclasses.replace(TRAIN, batch_size=5, captions_per_image=0)  # 5 captions: 1 image a step
    model = Captioner.build(MODEL, len(vocab))
    with pytest.raises(ValueError, match=r"train\.batch_size 5 makes steps of 1 image"):
        fit(model, training_data(vocab, train, val, SIZE, params), params, seed=0, runtime=INLINE, callbacks=Callbacks())


def _rank(rank: int, port: int, n: int, train: Split, val: Split, vocab: Vocabulary, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = Captioner.build(MODEL, len(vocab))
        params = dataclasses.replace(TRAIN, epochs=2)
        result = fit(model, training_data(vocab, _first(train, n), val, SIZE, params, _cached(model, _first(train, n), val)),
                     params, seed=0, runtime=Runtime(compute=INLINE.compute, world=World(rank, 2)), callbacks=Callbacks())
        out[rank] = (result.steps, {k: v.clone() for k, v in result.best_state.items()})
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # seconds of subprocesses: CI runs it, the edit-test loop does not
@pytest.mark.parametrize("n", [1, 129])
def test_two_gloo_processes_train_any_size_in_step(data_129, n):
    """1 image: repeated to 2 per process; 129: the last image joins the batch of 128, split 65/64.
    Both processes take every step and end with the same weights."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    train, val, vocab = data_129
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(port, n, train, val, vocab, out), nprocs=2, join=True)
    (steps0, weights0), (steps1, weights1) = out[0], out[1]
    assert steps0 == steps1 == 2
    assert all(torch.equal(weights0[k], weights1[k]) for k in weights0)
