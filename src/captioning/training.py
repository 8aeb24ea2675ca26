"""The training loop: the seed's (Adam, CrossEntropy on packed targets, teacher forcing), plus
validation on generated captions each epoch, best-checkpoint selection, early stopping and
exact resume.

Exact resume works because nothing here draws from a global RNG: batch order is a function of
(seed, epoch) and each item's augmentation a function of its own seed (see `data.py`). Restoring
weights, optimizer state and the position in the epoch therefore continues the same run.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import DataLoader

from captioning import accel
from captioning.accel import World
from captioning.data import CaptionDataset, EpochBatchSampler, FeatureDataset, collate_captions
from captioning.datasets import Split
from captioning.images import EvalTransform, TrainTransform
from captioning.io import atomic_path
from captioning.metrics import grounded_score, quick_scores
from captioning.model import Captioner
from captioning.params import ComputeParams, ModelParams, TrainParams
from captioning.text import Vocabulary


class Callbacks(Protocol):
    def on_step(self, row: dict) -> None: ...

    def on_epoch(self, row: dict) -> None: ...


@dataclass
class FitResult:
    best_state: dict  # weights of the selected epoch
    best_epoch: int
    best: dict  # that epoch's validation row
    history: list[dict] = field(default_factory=list)  # one row per epoch
    final_train_loss: float = math.nan
    steps: int = 0
    seconds: float = 0.0


def trainable_parameters(model: Captioner) -> list[nn.Parameter]:
    """The seed's optimizer set: decoder + encoder head, plus the backbone when it trains."""
    params = list(model.decoder.parameters()) + list(model.encoder.linear.parameters())
    params += list(model.encoder.batch_norm.parameters())
    if model.encoder.train_backbone:
        params += list(model.encoder.backbone.parameters())
    return params


def images_per_batch(split: Split, captions_per_batch: int, captions_per_image: int = 0) -> int:
    """`train.batch_size` counts captions, as in the seed; a batch holds whole images."""
    per_image = median(len(c) for c in split.captions.values() if c) if split.captions else 1
    if captions_per_image:
        per_image = min(per_image, captions_per_image)
    return max(1, round(captions_per_batch / per_image))


def fit(model: Captioner, vocab: Vocabulary, train_split: Split, val_split: Split,
        model_params: ModelParams, params: TrainParams, seed: int, device: torch.device,
        callbacks: Callbacks, resume_path: Path | None = None,
        features: tuple[np.ndarray, np.ndarray] | None = None, here: World = World(),
        compute: ComputeParams = ComputeParams()) -> FitResult:
    """Train `model`; from images, or from cached (train, val) backbone features when given
    (the backbone must then be frozen: its output is what was cached).

    Under torchrun (`here.size` > 1) the model is wrapped in DistributedDataParallel and each
    process takes its share of every batch; only rank 0 writes resume state, but every rank
    validates (on identical weights) so all take the same early-stopping decision.
    """
    model.to(device)
    if features is not None:
        if model.encoder.train_backbone:
            raise ValueError("cached features need a frozen backbone (model.train_backbone: false)")
        dataset = FeatureDataset(train_split, vocab, features[0], params.captions_per_image)
        val_dataset = FeatureDataset(val_split, vocab, features[1])
        encode = model.encoder.head  # the inputs are the pooled backbone output
    else:
        dataset = CaptionDataset(train_split, vocab, TrainTransform(
            model_params.image_size, random_crop=params.random_crop, hflip=params.hflip),
            captions_per_image=params.captions_per_image)
        val_dataset = CaptionDataset(val_split, vocab, EvalTransform(model_params.image_size))
        encode = model.encoder
    # Cached features are in memory already: worker processes would only add start-up and copies.
    workers = 0 if features is not None else compute.num_workers
    pooled = features is not None
    if not pooled:
        model.encoder.backbone = accel.channels_last(model.encoder.backbone, device)
    net = DistributedDataParallel(model) if here.size > 1 else model
    net = accel.maybe_compile(net, params.compile)
    batch_images = images_per_batch(train_split, params.batch_size, params.captions_per_image)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=params.lr)
    criterion = nn.CrossEntropyLoss()
    higher_is_better = params.select_metric != "val_loss"

    state = {"epoch": 0, "batch": 0, "step": 0, "best": None, "best_epoch": 0, "best_state": None,
             "history": [], "stale_epochs": 0, "seconds": 0.0, "epoch_loss": 0.0}
    if resume_path is not None and resume_path.is_file():
        saved = torch.load(resume_path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        print(f"resumed from {resume_path} at epoch {state['epoch'] + 1}, step {state['step']}")

    def save_resume() -> None:
        if resume_path is None or not here.is_main:
            return
        with atomic_path(resume_path) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "state": state}, tmp)

    started = time.perf_counter() - state["seconds"]
    while state["epoch"] < params.epochs:
        epoch = state["epoch"]
        sampler = EpochBatchSampler(len(dataset), batch_images, seed, epoch, start=state["batch"],
                                    rank=here.rank, world=here.size)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_captions,
                            num_workers=workers, pin_memory=device.type == "cuda")
        total = state["batch"] + len(sampler)
        # Summed on the device: reading it every step would sync the host with the GPU.
        epoch_loss = torch.tensor(state["epoch_loss"], device=device)
        model.train()
        for inputs, captions, lengths, image_index in loader:
            inputs = inputs.to(device, non_blocking=True)
            if not pooled:
                inputs = accel.channels_last(inputs, device)
            captions = captions.to(device, non_blocking=True)
            targets = pack_padded_sequence(captions, lengths, batch_first=True).data
            with accel.autocast(device, compute.bf16):
                logits = net(inputs, captions, lengths, image_index.to(device), pooled=pooled)
                loss = criterion(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["batch"] += 1
            state["step"] += 1
            epoch_loss += loss.detach()
            if state["step"] % params.log_every == 0:  # the only host sync in the loop
                value = float(loss.detach())
                callbacks.on_step({"step": state["step"], "epoch": epoch + 1, "batch": state["batch"],
                                   "batches": total, "loss": value, "perplexity": math.exp(min(value, 50))})
            if state["step"] % params.checkpoint_every == 0:
                state["seconds"], state["epoch_loss"] = time.perf_counter() - started, float(epoch_loss)
                save_resume()
        if here.size > 1:  # BatchNorm running statistics drift apart per process: use rank 0's
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, 0)
        row = {"epoch": epoch + 1, "train_loss": float(epoch_loss) / max(state["batch"], 1),
               **validate(model, val_dataset, val_split, vocab, device, criterion, encode)}
        state["history"].append(row)
        score = row[params.select_metric]
        improved = state["best"] is None or (
            score > state["best"][params.select_metric] if higher_is_better else score < state["best"][params.select_metric])
        if improved:
            state["best"], state["best_epoch"], state["stale_epochs"] = row, epoch + 1, 0
            state["best_state"] = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            state["stale_epochs"] += 1
        callbacks.on_epoch({**row, "best_epoch": state["best_epoch"]})
        state["epoch"], state["batch"], state["epoch_loss"] = epoch + 1, 0, 0.0
        state["seconds"] = time.perf_counter() - started
        if params.patience and state["stale_epochs"] >= params.patience:
            print(f"early stop: {params.select_metric} did not improve for {params.patience} epochs")
            break
        save_resume()
    return FitResult(state["best_state"], state["best_epoch"], state["best"], state["history"],
                     final_train_loss=state["history"][-1]["train_loss"], steps=state["step"],
                     seconds=time.perf_counter() - started)


@torch.no_grad()
def validate(model: Captioner, dataset: CaptionDataset, split: Split, vocab: Vocabulary,
             device: torch.device, criterion: nn.Module, encode=None, batch_images: int = 64) -> dict:
    """Teacher-forced loss and scores of greedy captions on the val split.

    `encode` maps the dataset's inputs to embeddings: the whole encoder for images (the
    default), the encoder head for cached features."""
    encode = encode or model.encoder
    model.eval()
    sampler = [[(i, 0) for i in range(k, min(k + batch_images, len(dataset)))]
               for k in range(0, len(dataset), batch_images)]
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_captions)
    loss_sum, tokens, hypotheses = 0.0, 0, {}
    for batch, (inputs, captions, lengths, image_index) in zip(sampler, loader):
        features = encode(inputs.to(device))  # (B, E)
        captions = captions.to(device)
        logits = model.decoder(features[image_index.to(device)], captions, lengths)
        targets = pack_padded_sequence(captions, lengths, batch_first=True).data
        loss_sum += float(criterion(logits, targets)) * len(targets)
        tokens += len(targets)
        for (index, _), ids in zip(batch, model.decoder.greedy(features, vocab.end_id).tolist()):
            hypotheses[dataset.records[index]["id"]] = vocab.decode(ids)
    row = {"val_loss": loss_sum / max(tokens, 1), **quick_scores(split.captions, hypotheses)}
    scenes = {r["id"]: r["scene"] for r in dataset.records if "scene" in r}
    if len(scenes) == len(hypotheses):  # only where scenes exist (synthetic): absent, not NaN, elsewhere
        row["grounded"] = grounded_score(scenes, hypotheses)
    return row
