"""The training loop: the seed's (Adam, CrossEntropy on packed targets, teacher forcing), plus
validation on generated captions each epoch, best-epoch selection, early stopping and exact resume.

Read top to bottom: `fit` is the driver; `train_one_epoch` (given the epoch's loader) and
`validate` do the work; the `ResumeState` dataclass is everything a resumed run needs beside
weights and optimizer, and `ResumeFile` its only reader and writer. DistributedDataParallel and
torch.compile are applied in `fit` alone; `train_one_epoch` only sees the wrapped network. What a
batch is trained on is an `Objective`: `CrossEntropy` here, self-critical training in `scst`.

Exact resume works because nothing here draws from a global RNG: batch order is a function of
(seed, epoch) and each item's augmentation a function of its own seed (see `data.py`). Restoring
weights, optimizer state and the position in the epoch therefore continues the same run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from statistics import median

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import DataLoader

from captioning import accel, features
from captioning.accel import Runtime, World
from captioning.data import CaptionDataset, EpochBatchSampler, FeatureDataset, collate_captions
from captioning.images import Transform
from captioning.io import atomic_path, file_digest
from captioning.layout import Split
from captioning.metrics import quick_scores
from captioning.model import Captioner
from captioning.optim import TrainingStep, adam, lr_schedule
from captioning.params import Params, ParamsError, ScstParams, TrainParams
from captioning.text import Vocabulary

# Scores that need more than the captions (the synthetic data's scenes): (records, id -> caption)
# -> {name: score}. The train stage plugs one in where the records allow it.
SceneScores = Callable[[list[dict], dict[int, str]], dict[str, float]]


class Objective:
    """What a step minimises on one batch of the loader. `module(model)` is what DDP wraps and
    `__call__` runs: `(net, batch) -> (the loss to log, the objective)`, called under autocast;
    `row(loss)` is what a logged step adds to its row beside the loss."""

    def module(self, model: Captioner) -> nn.Module:
        return model

    def __call__(self, net: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def row(self, loss: float) -> dict[str, float]:
        return {}


class CrossEntropy(Objective):
    """The seed's objective: teacher-forced cross-entropy of a batch's captions (plus, for the
    attention decoder, `attention_reg` times its regulariser). `cached`: the inputs are the
    backbone's cached output, not images."""

    def __init__(self, runtime: Runtime, cached: bool, attention_reg: float):
        self.runtime, self.cached, self.attention_reg = runtime, cached, attention_reg
        self.criterion = nn.CrossEntropyLoss()

    def __call__(self, net: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, captions, lengths, image_index = batch
        device = self.runtime.device
        inputs = inputs.to(device, non_blocking=True)
        inputs = inputs if self.cached else self.runtime.channels_last(inputs)
        captions = captions.to(device, non_blocking=True)
        targets = pack_padded_sequence(captions, lengths, batch_first=True).data
        logits, penalty = net(inputs, captions, lengths, image_index.to(device), cached=self.cached)
        loss = self.criterion(logits.float(), targets)  # logged: comparable with val_loss and across decoders
        return loss, (loss if penalty is None else loss + self.attention_reg * penalty.float())

    def row(self, loss: float) -> dict[str, float]:
        return {"perplexity": math.exp(min(loss, 50))}


class Callbacks:
    """What `fit` reports: a row per logged step and per epoch. This base reports nowhere (the
    ranks other than 0 under torchrun); the train stage's MLflow logger overrides both."""

    def on_step(self, row: dict) -> None:
        pass

    def on_epoch(self, row: dict) -> None:
        pass


@dataclass(frozen=True)
class TrainingData:
    """What `fit` trains and validates on."""

    vocab: Vocabulary
    train: CaptionDataset
    val: CaptionDataset
    val_references: dict[int, list[str]]  # val image id -> reference captions
    images_per_batch: int
    cached: bool  # the inputs are the backbone's cached output (pooled or grid), not images
    scene_scores: SceneScores | None = None
    collate: Callable = collate_captions  # the train loader's batches, as the objective reads them


def training_data(vocab: Vocabulary, train_split: Split, val_split: Split, image_size: int,
                  params: TrainParams, features: tuple[np.ndarray, np.ndarray] | None = None,
                  scene_scores: SceneScores | None = None) -> TrainingData:
    """Datasets from images, or from the cached (train, val) backbone output when given."""
    if features is not None:
        train = FeatureDataset(train_split, vocab, features[0], params.captions_per_image)
        val = FeatureDataset(val_split, vocab, features[1])
    else:
        train = CaptionDataset(train_split, vocab, Transform(image_size, random_crop=params.random_crop,
                                                             hflip=params.hflip), params.captions_per_image)
        val = CaptionDataset(val_split, vocab, Transform(image_size))
    return TrainingData(vocab, train, val, val_split.captions,
                        images_per_batch(train_split, params.batch_size, params.captions_per_image),
                        cached=features is not None, scene_scores=scene_scores)


def captioner_and_data(splits: tuple[Split, Split], backbone: str | Path, cached: str | Path, vocab: Vocabulary,
                       params: Params, scene_scores: SceneScores | None = None) -> tuple[Captioner, TrainingData]:
    """The captioner to train (on the pretrained `backbone` file) and its data (`data_for`)."""
    model = Captioner.build(params.model, len(vocab), torch.load(backbone, map_location="cpu", weights_only=True))
    return model, data_for(model, splits, cached, vocab, params, scene_scores)


def data_for(model: Captioner, splits: tuple[Split, Split], cached: str | Path, vocab: Vocabulary, params: Params,
             scene_scores: SceneScores | None = None) -> TrainingData:
    """The (train, val) `splits` as `model` trains on them: their images, or with a frozen
    backbone their features in the `cached` folder."""
    train_split, val_split = splits
    arrays = None
    if not params.model.train_backbone:  # the backbone is frozen: its output is cached
        arrays = tuple(features.read(cached, name, [r["id"] for r in split.images], model.encoder.feature_size,
                                     grid=params.model.decoder == "attention")
                       for name, split in (("train", train_split), ("val", val_split)))
    return training_data(vocab, train_split, val_split, params.model.image_size, params.train, arrays, scene_scores)


def launch(params: Params, argv: list[str], connect: Callable[[], object]) -> Runtime | None:
    """This training process's `Runtime`, or None where this process only started torchrun's
    (`train.processes` x `train.nodes` > 1). Node 0's main process checks the store (`connect`)
    first, so a store that is down stops the stage before any work."""
    accel.check_node(params.train.nodes)
    if accel.world().is_main and accel.node_rank() == 0:
        connect()
    if accel.relaunch(params.train.processes, params.train.nodes, argv):
        return None
    torch.manual_seed(params.seed)
    return accel.runtime(params.compute, distributed=True)


def resume_key(params: Params, vocab: Vocabulary, *inputs: Path) -> str:
    """Resume state is only valid for the same data, backbone, vocab and training params.

    The cached features are keyed by what makes them (the backbone file and `features.*`), not
    hashed: on COCO with several views they are gigabytes."""
    sections = params.to_dict()
    blob = json.dumps([params.seed, sections["model"], sections["train"], sections["features"], vocab.words,
                       [file_digest(path) for path in inputs]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def images_per_batch(split: Split, captions_per_batch: int, captions_per_image: int = 0) -> int:
    """`train.batch_size` counts captions, as in the seed; a batch holds whole images."""
    captioned = split.captioned()
    per_image = median(len(split.captions[r["id"]]) for r in captioned) if captioned else 1
    if captions_per_image:
        per_image = min(per_image, captions_per_image)
    return max(1, round(captions_per_batch / per_image))


def trainable_parameters(model: Captioner) -> list[nn.Parameter]:
    """The seed's optimizer set: decoder + encoder head (the LSTM decoder's), plus the backbone
    when it trains."""
    params = list(model.decoder.parameters())
    params += [p for name, p in model.encoder.named_parameters() if not name.startswith("backbone.")]
    if model.encoder.train_backbone:
        params += list(model.encoder.backbone.parameters())
    return params


@dataclass
class ResumeState:
    """Where a run stands, beside its weights and optimizer state."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of the current epoch trained
    step: int = 0  # optimizer steps in all
    epoch_loss: float = 0.0  # summed over the current epoch's batches
    seconds: float = 0.0  # training time so far
    history: list[dict] = field(default_factory=list)  # one validation row per epoch
    step_rows: list[dict] = field(default_factory=list)  # one row per logged step (train.log_every)
    best: dict | None = None  # the kept epoch's row
    best_epoch: int = 0
    best_state: dict | None = None  # the kept epoch's weights, on the CPU
    stale_epochs: int = 0  # epochs since the best one, for early stopping

    def keep_if_best(self, row: dict, model: nn.Module, metric: str) -> None:
        """Make `row`'s epoch the kept one if its `metric` beats the best so far ("last": always)."""
        lower_is_better = metric == "val_loss"
        if (self.best is None or metric == "last"
                or (row[metric] < self.best[metric] if lower_is_better else row[metric] > self.best[metric])):
            self.best, self.best_epoch, self.stale_epochs = row, row["epoch"], 0
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            self.stale_epochs += 1


class ResumeFile:
    """Weights, optimizer state and `ResumeState` in one file (`path` None: no resume). Under
    DDP only rank 0 writes it; every rank reads it."""

    def __init__(self, path: Path | None, here: World):
        self.path, self.here = path, here

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> ResumeState:
        if self.path is None or not self.path.is_file():
            return ResumeState()
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = ResumeState(**saved["state"])
        print(f"resumed from {self.path} at epoch {state.epoch + 1}, step {state.step}")
        return state

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: ResumeState) -> None:
        if self.path is None or not self.here.is_main:
            return
        # A plain dict (not the dataclass) so that loading stays weights_only
        plain = {f.name: getattr(state, f.name) for f in fields(state)}
        with atomic_path(self.path) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": plain}, tmp)


@dataclass
class FitResult:
    best_state: dict  # weights of the selected epoch
    best_epoch: int
    best: dict  # that epoch's validation row
    history: list[dict] = field(default_factory=list)  # one row per epoch
    step_rows: list[dict] = field(default_factory=list)  # one row per logged step, a resumed run's included
    final_train_loss: float = math.nan
    steps: int = 0
    seconds: float = 0.0


def fit(model: Captioner, data: TrainingData, params: TrainParams | ScstParams, *, seed: int, runtime: Runtime,
        callbacks: Callbacks, resume_path: Path | None = None, objective: Objective | None = None) -> FitResult:
    """Train `model` for `params.epochs` (or until early stopping) on `objective` (the seed's
    cross-entropy when None); validate after each epoch and keep the best epoch's weights by
    `params.select_metric`. Under `ScstParams` the model as given is validated first, as epoch 0:
    fine-tuning keeps it unless an epoch beats it.

    With cached features (`data.cached`) the backbone must be frozen: its output is what was
    cached. Under torchrun (`runtime.world.size` > 1) the model is wrapped in DistributedDataParallel
    and each process takes its share of every batch; every rank validates (on identical weights),
    so all take the same early-stopping decision.
    """
    here = runtime.world
    if data.cached and model.encoder.train_backbone:
        raise ValueError("cached features need a frozen backbone (model.train_backbone: false)")
    if data.images_per_batch < 2 * here.size:  # BatchNorm needs 2 images per process (data.EpochBatchSampler)
        raise ParamsError(f"{params.section}.batch_size {params.batch_size} makes steps of {data.images_per_batch} "
                          f"image(s); BatchNorm needs at least 2 per process ({here.size}): raise it")
    objective = objective or CrossEntropy(runtime, data.cached, params.attention_reg)
    model.to(runtime.device)
    if not data.cached:
        model.encoder.backbone = runtime.channels_last(model.encoder.backbone)
    net = objective.module(model)
    net = accel.maybe_compile(DistributedDataParallel(net) if here.size > 1 else net,
                              isinstance(params, TrainParams) and params.compile)
    optimizer = adam(trainable_parameters(model), params.lr, runtime.device)
    resume = ResumeFile(resume_path, here)
    state = resume.load(model, optimizer)
    total_steps = params.epochs * len(epoch_sampler(data, seed, 0, runtime))
    step = TrainingStep(optimizer, lr_schedule(optimizer, params.schedule, params.lr, total_steps, state.step), runtime)
    started = time.perf_counter() - state.seconds

    def checkpoint() -> None:
        state.seconds = time.perf_counter() - started
        resume.save(model, optimizer, state)

    if isinstance(params, ScstParams) and not state.history:
        row = {"epoch": 0, "train_loss": math.nan, **validate(model, data, runtime.device)}
        state.history.append(row)
        state.keep_if_best(row, model, params.select_metric)
        callbacks.on_epoch({**row, "best_epoch": 0})
    while state.epoch < params.epochs:
        loader = epoch_loader(data, epoch_sampler(data, seed, state.epoch, runtime, state.batch), runtime)
        train_one_epoch(net, loader, step, state, params, objective, callbacks, checkpoint)
        if here.size > 1:  # BatchNorm running statistics drift apart per process: use rank 0's
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, 0)
        row = {"epoch": state.epoch + 1, "train_loss": state.epoch_loss / max(state.batch, 1),
               **validate(model, data, runtime.device)}
        if end_epoch(state, row, model, params, callbacks):
            break
        checkpoint()
    return FitResult(state.best_state, state.best_epoch, state.best, state.history, state.step_rows,
                     final_train_loss=state.history[-1]["train_loss"], steps=state.step,
                     seconds=time.perf_counter() - started)


def end_epoch(state: ResumeState, row: dict, model: nn.Module, params: TrainParams | ScstParams,
              callbacks: Callbacks) -> bool:
    """Record the epoch's validation `row`, keep the epoch if it is the best, and move `state` to
    the next epoch. True: stop early (`params.select_metric` stale for `params.patience` epochs)."""
    state.history.append(row)
    state.keep_if_best(row, model, params.select_metric)
    callbacks.on_epoch({**row, "best_epoch": state.best_epoch})
    state.epoch, state.batch, state.epoch_loss = state.epoch + 1, 0, 0.0
    if params.patience and state.stale_epochs >= params.patience:
        print(f"early stop: {params.select_metric} did not improve for {params.patience} epochs")
        return True
    return False


def epoch_sampler(data: TrainingData, seed: int, epoch: int, runtime: Runtime, start: int = 0) -> EpochBatchSampler:
    """This process's batches of `epoch`, from batch `start` on."""
    return EpochBatchSampler(len(data.train), data.images_per_batch, seed, epoch, start=start,
                             rank=runtime.world.rank, world=runtime.world.size)


def epoch_loader(data: TrainingData, sampler: EpochBatchSampler, runtime: Runtime) -> DataLoader:
    # Cached features are in memory (or, past data.IN_MEMORY_BYTES, memory-mapped in the page
    # cache): worker processes would only add start-up and copies.
    return DataLoader(data.train, batch_sampler=sampler, collate_fn=data.collate,
                      num_workers=0 if data.cached else runtime.compute.num_workers, pin_memory=runtime.pin_memory)


def train_one_epoch(net: nn.Module, loader: DataLoader, step: TrainingStep, state: ResumeState,
                    params: TrainParams | ScstParams, objective: Objective, callbacks: Callbacks,
                    checkpoint: Callable[[], None]) -> None:
    """Train on `loader`'s batches (the rest of epoch `state.epoch`), advancing `state` batch by
    batch and calling `checkpoint` every `params.checkpoint_every` steps."""
    total = state.batch + len(loader)
    # Summed on the device: reading it every step would sync the host with the GPU.
    epoch_loss = torch.tensor(state.epoch_loss, device=step.runtime.device)
    net.train()
    for batch in loader:
        loss = step(lambda: objective(net, batch))
        state.batch, state.step = state.batch + 1, state.step + 1
        epoch_loss += loss
        if state.step % params.log_every == 0:  # the only host sync in the loop
            value = float(loss)
            row = {"step": state.step, "epoch": state.epoch + 1, "batch": state.batch, "batches": total,
                   "loss": value, **objective.row(value)}
            state.step_rows.append(row)
            callbacks.on_step(row)
        if state.step % params.checkpoint_every == 0:
            state.epoch_loss = float(epoch_loss)
            checkpoint()
    state.epoch_loss = float(epoch_loss)


@torch.no_grad()
def validate(model: Captioner, data: TrainingData, device: torch.device, batch_images: int = 64) -> dict:
    """Teacher-forced loss and scores of greedy captions on the val split (plus the scene
    scores where `data` has them)."""
    dataset, vocab = data.val, data.vocab
    encode = model.encoder.head if data.cached else model.encoder  # cached features are the backbone's output
    criterion = nn.CrossEntropyLoss()
    model.eval()
    sampler = [[(i, 0) for i in range(k, min(k + batch_images, len(dataset)))]
               for k in range(0, len(dataset), batch_images)]
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_captions)
    loss_sum, tokens, hypotheses = 0.0, 0, {}
    for batch, (inputs, captions, lengths, image_index) in zip(sampler, loader):
        features = encode(inputs.to(device))
        captions = captions.to(device)
        logits, _ = model.decoder(features[image_index.to(device)], captions, lengths)
        targets = pack_padded_sequence(captions, lengths, batch_first=True).data
        loss_sum += float(criterion(logits, targets)) * len(targets)
        tokens += len(targets)
        for (index, _), ids in zip(batch, model.decoder.greedy(features, vocab.end_id).tolist()):
            hypotheses[dataset.records[index]["id"]] = vocab.decode(ids)
    row = {"val_loss": loss_sum / max(tokens, 1), **quick_scores(data.val_references, hypotheses)}
    if data.scene_scores is not None:
        row.update(data.scene_scores(dataset.records, hypotheses))
    return row
