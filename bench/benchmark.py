"""Side-by-side benchmark of the seed's ways and ours, in one run, on the same data and model.

    python bench/benchmark.py            # ~11 min on 2 idle CPU cores; prints a markdown table last
    python bench/benchmark.py --image-sizes 64 --scale-sizes 600,2400   # other input sides, shorter scaling
    python bench/benchmark.py --only eval_beam_single,eval_beam_batched   # some pieces (and what they need)
    python bench/benchmark.py --only reward_step,scst_step_lstm,scst_step_attention   # the SCST reward and step
    python bench/benchmark.py --device cuda --backbone resnet152 --bf16 --image-sizes 224 \
        --num-workers 8 --n-train 2000 --scale-sizes 2000,8000          # the seed's configuration on a GPU

Measured (each piece in its own freshly spawned process, so one piece's caches, threads and
memory never flatter or burden the next, and its peak RSS is its own):

1. A train epoch with a frozen resnet18: (a) the seed's loop, re-implemented here (one item per
   (image, caption) pair, JPEG decoded and caption tokenized in __getitem__, the CNN run once per
   caption, `loss.item()` every step) vs (b) `captioning.training.fit` itself (captions tokenized
   once, one item per image with all its captions, the CNN once per image per step).
   (c) the same `fit` on cached features (the features stage): the CNN once per image in all,
   timed apart as a one-off cost, then epochs of head + decoder only.
2. Resizing raw images to 256 px: `captioning.images.resize_all` (one process per core) vs a
   single-process Pillow loop.
3. Greedy captioning of the test images: `captioning.predict.caption_images` batched (64) vs the
   seed's way (one image at a time: open, transform, encoder, its `sample` loop of max_seq_len
   steps, ids to words), and vs `caption_images` itself at batch 1; the same for beam search
   (beam 3, `evaluate.length_penalty`'s default), which advances all images' beams together.
4. Peak RSS of the train epochs and of captioning.
5. Scaling of (b): seconds per image and peak RSS of an epoch at 1k, 3k and 10k train images
   (smaller images, to stay short).
6. The self-critical (SCST) reward against the step it serves: `captioning.reward.CiderD` with the
   document frequencies of 12,000 synthetic train images' references (the time to count them),
   scoring one step's 128 images x 5 samples batched (`scores`) vs one caption at a time (`score`),
   and whether both give the same rewards; then, for each decoder (lstm, attention) of the default
   `ModelParams`, steps with `ScstParams`' defaults on cached features (sample, reward, mean
   baseline, policy loss, backward, Adam), the reward timed apart from the rest. No images: only
   the captions. `--reward-module` times another version of the reward's file instead.

Pieces 1, 3 and 4 run once per input side (`IMAGE_SIZES`: the seed's 224 px crop and the
pipeline's 32 px), since which of CNN and decoder dominates the time depends on it.

Both train loops share the data, vocabulary, transform, initial weights (same torch seed), model
sizes, captions per step (128), learning rate and DataLoader workers: only the loop differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import multiprocessing
import os
import platform
import random
import resource
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import PIL
import torch
from PIL import Image
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import DataLoader, Dataset

from captioning import accel, features
from captioning.contention import QUIET_LOAD, busy_cpu_seconds, other_load, own_cpu_seconds
from captioning.images import Transform, resize_all
from captioning.layout import SPLITS, Split, images_dir, read_split
from captioning.model import Captioner
from captioning.params import (DECODERS, ComputeParams, DataParams, EvaluateParams, ModelParams, ScstParams,
                               TrainParams)
from captioning.predict import Decoding, caption_images
from captioning.reward import CiderD
from captioning.scst import advantages, policy_loss, words
from captioning.synthetic import make_captions, make_scene, split_seed, write_dataset
from captioning.text import END, Vocabulary, tokenize
from captioning.training import fit, trainable_parameters, training_data

RESIZE_SIDE = 256  # the resize stage's output, as in the seed
JPEG_QUALITY = 95
# The input sides the epoch and captioning comparisons run at: the seed's 224 px crop, where the CNN
# is most of the work, and the default pipeline's 32 px (model.image_size), where the decoder is.
IMAGE_SIZES = (224, 32)
LAST_STEPS = 5  # final loss = mean of this many last steps (one step's loss is noisy)


@dataclass(frozen=True)
class Setup:
    """Everything both sides of a comparison share."""

    n_train: int = 600
    n_test: int = 100  # images captioned in the evaluation comparison
    image_size: int = IMAGE_SIZES[0]  # network input side of the epoch and captioning comparisons
    scale_image_size: int = 32  # smaller for the scaling runs, to keep them short
    scale_sizes: tuple[int, ...] = (1000, 3000, 10000)  # train images of the scaling runs
    batch_captions: int = 128  # captions per step, the seed's batch size
    lr: float = 0.001
    embed_size: int = 256  # the seed's sizes
    hidden_size: int = 512
    num_workers: int = 1  # DataLoader workers, both loops (TrainParams' default)
    eval_batch: int = 64
    beam_size: int = 3
    repeats: int = 3  # passes of the short pieces (resize, captioning); the fastest counts
    seed: int = 42
    # Where the model pieces run. On CUDA both sides get the pipeline's process settings
    # (`accel.setup`: cuDNN autotuning, TF32) and, with bf16, bf16 autocast, so that A/B still
    # compares loops, not precisions; ours adds channels_last for the CNN, as the pipeline does.
    device: str = "cpu"
    backbone: str = "resnet18"
    bf16: bool = False
    # The self-critical pieces: the reward's document frequencies come from the references of
    # `reward_images` train images; steps are the scst stage's (ScstParams' defaults).
    reward_images: int = 12000
    scst: ScstParams = ScstParams()
    scst_steps: int = 5  # timed steps, after one untimed
    reward_module: str = ""  # a file with another version of captioning.reward's CiderD to time instead

    def torch_device(self) -> torch.device:
        """The device, with the pipeline's process-wide settings for it applied."""
        device = torch.device(self.device)
        accel.setup(device, deterministic=False)
        return device

    def model_params(self, image_size: int | None = None) -> ModelParams:
        return ModelParams(backbone=self.backbone, pretrained=False, train_backbone=False,
                           image_size=image_size or self.image_size, embed_size=self.embed_size,
                           hidden_size=self.hidden_size)

    def train_params(self, captions_per_image: int = 0) -> TrainParams:
        # log_every=1: fit then reads the loss every step, exactly as the seed's loop does.
        return TrainParams(epochs=1, batch_size=self.batch_captions, captions_per_image=captions_per_image,
                           lr=self.lr, log_every=1, checkpoint_every=10**9, hflip=False, random_crop=True,
                           select_metric="val_loss")

    def compute_params(self) -> ComputeParams:
        return ComputeParams(device=self.device, num_workers=self.num_workers, bf16=self.bf16)

    def runtime(self) -> accel.Runtime:
        return accel.Runtime(self.torch_device(), self.compute_params())


@dataclass(frozen=True)
class Paths:
    """Where the generated data lives (inside one temporary folder)."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def images(self) -> Path:
        return self.root / "resized"

    @property
    def vocab(self) -> Path:
        return self.root / "vocab.json"

    def model(self, image_size: int) -> Path:
        """The model the `ours` piece trains at that input size, which the captioning pieces use."""
        return self.root / f"model-{image_size}px.pt"

    @property
    def references(self) -> Path:
        """The self-critical pieces' references: image id -> captions, tokenized and ended."""
        return self.root / "references.json"

    @property
    def reward_vocab(self) -> Path:
        return self.root / "reward-vocab.json"


# ---- running a piece in isolation -----------------------------------------------------------

def _child(conn, start_method: str, fn, args) -> None:
    try:
        # A spawned process inherits "spawn" as its default start method; the measured code must see
        # the one a plain `python` run sees (fork on Linux), or every DataLoader and resize worker
        # would re-import torch and this module first (several seconds each).
        multiprocessing.set_start_method(start_method, force=True)
        result = fn(*args)
        # ru_maxrss is KiB on Linux. Children = DataLoader / resize workers, already joined here.
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        conn.send(("ok", {**result, "rss_mib": own.ru_maxrss / 1024, "workers_rss_mib": children.ru_maxrss / 1024}))
    except BaseException:  # noqa: BLE001  (reported to the parent, which re-raises)
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Stopwatch:
    """Wall time of a measured region, and the cores other processes used meanwhile.

    On 2 cores one busy neighbour wrecks torch's 2 OpenMP threads (a batch-1 resnet18 forward
    went from 11 ms to 650 ms here), so a contended figure must be visible as such.
    """

    def __init__(self):
        self.started, self.busy, self.own = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()

    def stop(self, end: float | None = None) -> dict:
        """`end`: when the measured work ended, if before now (the window for the load is all of it)."""
        now = time.perf_counter()
        return {"seconds": (end or now) - self.started, "other_load": other_load(self.busy, self.own, now - self.started)}


def best_of(repeats: int, work) -> dict:
    """The fastest of `repeats` timed calls of work() -> dict: short runs are noisy."""
    runs = []
    for _ in range(repeats):
        watch = Stopwatch()
        value = work()
        runs.append({**value, **watch.stop()})
    return min(runs, key=lambda run: run["seconds"])


def isolated(fn, *args) -> dict:
    """fn(*args) -> dict, run in a fresh spawned process; adds its peak RSS (MiB).

    A plain Process, not a Pool: pool workers are daemonic and may not start the DataLoader's or
    resize_all's own worker processes.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, multiprocessing.get_start_method(), fn, args))
    process.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"{fn.__name__} died (exit code {process.exitcode})") from None
    process.join()
    if status != "ok":
        raise RuntimeError(f"{fn.__name__} failed in its process:\n{payload}")
    return payload


def wait_for_quiet(max_wait: float, window: float = 3.0) -> None:
    """Wait (up to max_wait s) until other processes use < QUIET_LOAD core over `window` s."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        before = busy_cpu_seconds()
        time.sleep(window)
        if (busy_cpu_seconds() - before) / window < QUIET_LOAD:
            return


def measured(name: str, piece: tuple, attempts: int, max_wait: float) -> dict:
    """The least contended of up to `attempts` runs of a piece, each started on a quiet machine
    (a contended run is retried, and flagged in the report if it stays so)."""
    fn, *args = piece
    best = None
    for attempt in range(1, attempts + 1):
        wait_for_quiet(max_wait)
        result = isolated(fn, *args)
        print(f"[bench] {name} (try {attempt}): {result['seconds']:.1f} s, "
              f"other processes {result['other_load']:.2f} core", flush=True)
        if best is None or result["other_load"] < best["other_load"]:
            best = result
        if best["other_load"] < QUIET_LOAD:
            break
    return best


# ---- data -----------------------------------------------------------------------------------


def prepare_data(paths: Paths, setup: Setup, scaling: bool = True) -> None:
    """Synthetic raw images (enough train images for the largest scaling run, else N), their 256 px
    copies and the vocab."""
    n_train = max(setup.n_train, *setup.scale_sizes) if scaling else setup.n_train
    params = DataParams(num_train=n_train, num_val=20, num_test=setup.n_test, workers=2)
    write_dataset(paths.raw, params, seed=setup.seed)
    for split in SPLITS:
        records = read_split(paths.raw, split).images
        resize_all([(images_dir(paths.raw, split) / r["file_name"], images_dir(paths.images, split) / r["file_name"])
                    for r in records], RESIZE_SIDE, JPEG_QUALITY, workers=0, desc=f"resize {split}")
    train = read_split(paths.raw, "train")
    Vocabulary.build((c for caps in train.captions.values() for c in caps), threshold=1).save(paths.vocab)


def resized_split(paths: Paths, name: str) -> Split:
    """A split's raw captions, its images the resized copies."""
    return dataclasses.replace(read_split(paths.raw, name), images_dir=images_dir(paths.images, name))


def train_subset(paths: Paths, n: int) -> Split:
    """The first n train images (resized copies), with their captions."""
    split = resized_split(paths, "train")
    images = split.images[:n]
    return Split(images, {r["id"]: split.captions[r["id"]] for r in images}, split.images_dir)


# ---- 1a. the seed's train loop, re-implemented -----------------------------------------------


class SeedStyleDataset(Dataset):
    """One item per (image, caption) pair; decodes and tokenizes on every access, as the seed did."""

    def __init__(self, split: Split, vocab: Vocabulary, transform: Transform):
        self.pairs = [(split.image_path(r), c) for r in split.images for c in split.captions[r["id"]]]
        self.vocab, self.transform = vocab, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        path, caption = self.pairs[index]
        image = Image.open(path).convert("RGB")
        # The shared transform takes its randomness from an rng; the seed drew from the global one.
        image = self.transform(image, random.Random(index))
        tokens = tokenize(caption)
        ids = [self.vocab.start_id, *(self.vocab.index.get(t, self.vocab.unk_id) for t in tokens),
               self.vocab.end_id]
        return image, torch.tensor(ids)


def seed_collate(batch):
    """The seed's collate_fn: sort by caption length (longest first), stack images, pad captions."""
    batch.sort(key=lambda item: len(item[1]), reverse=True)
    images, captions = zip(*batch)
    lengths = [len(c) for c in captions]
    padded = torch.zeros(len(captions), max(lengths), dtype=torch.long)
    for i, caption in enumerate(captions):
        padded[i, : lengths[i]] = caption
    return torch.stack(images), padded, lengths


def new_model(setup: Setup, vocab: Vocabulary, image_size: int) -> Captioner:
    """A fresh model on the benchmark's device, its CNN warmed up."""
    # The same torch seed on both sides: identical initial weights.
    torch.manual_seed(setup.seed)
    device = setup.torch_device()
    model = Captioner.build(setup.model_params(image_size), len(vocab)).to(device)
    with torch.no_grad():  # first-call costs (oneDNN / cuDNN kernel choice) out of the timed epoch
        model.eval().encoder(torch.zeros(2, 3, image_size, image_size, device=device))
    return model


def run_seed_style(paths: Paths, setup: Setup) -> dict:
    vocab = Vocabulary.load(paths.vocab)
    split = train_subset(paths, setup.n_train)
    model = new_model(setup, vocab, setup.image_size)
    device = setup.torch_device()
    transform = Transform(setup.image_size, random_crop=True)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=setup.lr)
    criterion = nn.CrossEntropyLoss()
    watch = Stopwatch()
    loader = DataLoader(SeedStyleDataset(split, vocab, transform), batch_size=setup.batch_captions,
                        shuffle=True, collate_fn=seed_collate, num_workers=setup.num_workers)
    model.train()  # the frozen backbone stays in eval mode (Encoder.train)
    losses = []
    for images, captions, lengths in loader:
        images, captions = images.to(device), captions.to(device)
        targets = pack_padded_sequence(captions, lengths, batch_first=True).data
        with accel.autocast(device, setup.bf16):
            with torch.no_grad():
                pooled = model.encoder.cnn(images)  # once per caption: the seed's cost
            features = model.encoder.head(pooled)
            loss = criterion(model.decoder(features, captions, torch.tensor(lengths))[0], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {**watch.stop(), "steps": len(losses), "images": len(split.images),
            "captions": len(loader.dataset), "final_loss": sum(losses[-LAST_STEPS:]) / len(losses[-LAST_STEPS:])}


# ---- 1b / 5. ours: captioning.training.fit ----------------------------------------------------


class StepClock:
    """fit's callbacks: the time and loss of every step (the epoch ends at the last step, before
    fit's validation, which the seed's loop did not have)."""

    def __init__(self):
        self.times, self.losses = [], []

    def on_step(self, row: dict) -> None:
        self.times.append(time.perf_counter())
        self.losses.append(row["loss"])

    def on_epoch(self, row: dict) -> None:
        pass


def run_ours(paths: Paths, setup: Setup, n_train: int, image_size: int, captions_per_image: int = 0,
             save_model: bool = False) -> dict:
    vocab = Vocabulary.load(paths.vocab)
    split = train_subset(paths, n_train)
    val = resized_split(paths, "val")
    model = new_model(setup, vocab, image_size)
    clock = StepClock()
    watch = Stopwatch()  # includes fit's up-front caption tokenization
    params = setup.train_params(captions_per_image)
    result = fit(model, training_data(vocab, split, val, image_size, params), params, seed=setup.seed,
                 runtime=setup.runtime(), callbacks=clock)
    if save_model:
        torch.save({"config": model.config, "state": result.best_state}, paths.model(image_size))
    last = clock.losses[-LAST_STEPS:]
    return {**watch.stop(end=clock.times[-1]), "steps": len(clock.losses), "images": len(split.images),
            "captions": sum(len(c) for c in split.captions.values()), "final_loss": sum(last) / len(last)}


def run_ours_cached(paths: Paths, setup: Setup) -> dict:
    """Ours with the features stage: the frozen backbone once per image (timed apart, a one-off
    cost that DVC caches across every later change of train.*), then an epoch of `fit` on the
    cached features."""
    vocab = Vocabulary.load(paths.vocab)
    split = train_subset(paths, setup.n_train)
    val = resized_split(paths, "val")
    model = new_model(setup, vocab, setup.image_size)
    extraction = Stopwatch()
    cached = tuple(features.extract(model.encoder.backbone, [s.image_path(r) for r in s.images],
                                    features.Views(setup.image_size, 1, False), seed=setup.seed, batch_size=128,
                                    runtime=setup.runtime(), desc="bench features")
                   for s in (split, val))
    extract_seconds = extraction.stop()["seconds"]
    clock = StepClock()
    watch = Stopwatch()
    params = setup.train_params()
    fit(model, training_data(vocab, split, val, setup.image_size, params, cached), params, seed=setup.seed,
        runtime=setup.runtime(), callbacks=clock)
    last = clock.losses[-LAST_STEPS:]
    return {**watch.stop(end=clock.times[-1]), "extract_seconds": extract_seconds,
            "extracted": sum(len(c) for c in cached), "steps": len(clock.losses),
            "images": len(split.images), "captions": sum(len(c) for c in split.captions.values()),
            "final_loss": sum(last) / len(last)}


# ---- 2. resize --------------------------------------------------------------------------------


def resize_pairs(paths: Paths, setup: Setup, out: str) -> list[tuple[Path, Path]]:
    names = [r["file_name"] for r in read_split(paths.raw, "train").images[: setup.n_train]]
    folder = paths.root / out
    folder.mkdir(exist_ok=True)
    return [(images_dir(paths.raw, "train") / name, folder / name) for name in names]


def library_resize(pairs: list[tuple[Path, Path]]) -> dict:
    resize_all(pairs, RESIZE_SIDE, JPEG_QUALITY, workers=0, desc="resize_all")  # 0: a process per core
    return {"images": len(pairs)}


def run_resize_ours(paths: Paths, setup: Setup) -> dict:
    pairs = resize_pairs(paths, setup, "resize-ours")
    return best_of(setup.repeats, lambda: library_resize(pairs))


def pillow_loop(pairs: list[tuple[Path, Path]]) -> dict:
    """The plain way: one process, no JPEG draft, Pillow's default reducing."""
    for src, dst in pairs:
        with Image.open(src) as image:
            image.convert("RGB").resize((RESIZE_SIDE, RESIZE_SIDE), Image.Resampling.LANCZOS).save(
                dst, format="JPEG", quality=JPEG_QUALITY)
    return {"images": len(pairs)}


def run_resize_single(paths: Paths, setup: Setup) -> dict:
    pairs = resize_pairs(paths, setup, "resize-single")
    return best_of(setup.repeats, lambda: pillow_loop(pairs))


# ---- 3. evaluation ----------------------------------------------------------------------------


def run_caption(paths: Paths, setup: Setup, batch_size: int, beam_size: int = 1) -> dict:
    vocab = Vocabulary.load(paths.vocab)
    saved = torch.load(paths.model(setup.image_size), map_location="cpu", weights_only=True)
    model = Captioner(saved["config"])
    model.load_state_dict(saved["state"])
    test = resized_split(paths, "test")
    image_paths = [test.image_path(r) for r in test.images]
    device = setup.torch_device()
    decoding = Decoding(beam_size, EvaluateParams.length_penalty, setup.bf16)
    caption_images(model, vocab, image_paths[:2], device, decoding, batch_size=2, progress=False)  # warm-up
    return best_of(setup.repeats, lambda: {
        "images": len(image_paths),
        "captions": caption_images(model, vocab, image_paths, device, decoding, batch_size=batch_size,
                                   progress=False)})


def seed_sample(decoder, features: torch.Tensor) -> torch.Tensor:
    """The seed's `LSTMModel.sample`, verbatim in substance: all max_seq_len steps, no early stop."""
    sampled, inputs, states = [], features.unsqueeze(1), None
    for _ in range(decoder.max_seq_len):
        hiddens, states = decoder.lstm(inputs, states)
        predicted = decoder.linear(hiddens.squeeze(1)).max(1)[1]
        sampled.append(predicted)
        inputs = decoder.embedding(predicted).unsqueeze(1)
    return torch.stack(sampled, 1)


def run_caption_seed_style(paths: Paths, setup: Setup) -> dict:
    """The seed's way to caption: one image at a time, as its sample script does: open and
    transform the image, the encoder, `sample`, ids to words. (The same Transform as ours, so
    both sides see identical pixels and must agree on every caption.)"""
    vocab = Vocabulary.load(paths.vocab)
    saved = torch.load(paths.model(setup.image_size), map_location="cpu", weights_only=True)
    model = Captioner(saved["config"])
    model.load_state_dict(saved["state"])
    device = setup.torch_device()
    model.eval().to(device)
    test = resized_split(paths, "test")
    image_paths = [test.image_path(r) for r in test.images]
    transform = Transform(model.config["image_size"])

    @torch.no_grad()
    def caption_one(path: Path) -> str:
        image = transform(Image.open(path).convert("RGB")).unsqueeze(0).to(device)
        with accel.autocast(device, setup.bf16):  # as `Captioner.generate`: the CNN only
            features = model.encoder(image)
        return vocab.decode(seed_sample(model.decoder, features.float())[0].tolist())

    caption_one(image_paths[0])  # warm-up, as for ours
    return best_of(setup.repeats, lambda: {"images": len(image_paths),
                                           "captions": [caption_one(path) for path in image_paths]})


# ---- 6. the self-critical reward against the step ----------------------------------------------


def prepare_references(paths: Paths, setup: Setup) -> None:
    """The captions of `setup.reward_images` synthetic train images, as `make_sample` draws them
    (without rendering the pixels, which no reward looks at), tokenized and ended as the reward
    compares them; and their vocabulary."""
    data = DataParams()
    captions = {}
    for index in range(setup.reward_images):
        rng = split_seed(setup.seed, "train", index)
        captions[index] = make_captions(make_scene(rng, data.min_side, data.max_side), rng, data.captions_per_image)
    paths.references.write_text(json.dumps(
        {i: [" ".join([*tokenize(c), END]) for c in caps] for i, caps in captions.items()}))
    Vocabulary.build((c for caps in captions.values() for c in caps), threshold=1).save(paths.reward_vocab)


def load_references(paths: Paths) -> dict[int, list[str]]:
    return {int(i): caps for i, caps in json.loads(paths.references.read_text()).items()}


def reward_class(setup: Setup) -> type:
    """captioning.reward's CiderD, or that of the file `setup.reward_module`."""
    if not setup.reward_module:
        return CiderD
    spec = importlib.util.spec_from_file_location("reward_under_test", setup.reward_module)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CiderD


def run_reward(paths: Paths, setup: Setup) -> dict:
    """The reward of one step's samples: a trained captioner's samples are captions of the
    grammar, so half are one of the image's references and half another image's."""
    references = load_references(paths)
    watch = Stopwatch()
    reward = reward_class(setup)(references)
    frequencies = watch.stop()["seconds"]
    rng = random.Random(setup.seed)
    ids = list(references)
    images = [i for i in rng.sample(ids, setup.scst.batch_size) for _ in range(setup.scst.samples)]
    captions = [rng.choice(references[i if rng.random() < 0.5 else rng.choice(ids)]) for i in images]
    first = Stopwatch()
    reward.scores(images, captions)  # the images' references are weighed now, and kept
    cold = first.stop()["seconds"]
    batched = best_of(setup.repeats, lambda: {"scores": reward.scores(images, captions)})
    alone = best_of(setup.repeats, lambda: {"scores": [reward.score(i, c) for i, c in zip(images, captions)]})
    return {**watch.stop(), "frequencies_seconds": frequencies, "cold_seconds": cold,
            "batched_seconds": batched["seconds"], "single_seconds": alone["seconds"],
            "max_difference": float(max(abs(a - b) for a, b in zip(batched["scores"], alone["scores"]))),
            "images": len(references), "captions": len(captions)}


def run_scst_step(paths: Paths, setup: Setup, decoder: str) -> dict:
    """Self-critical steps of the default model with `decoder`, on cached features (random: the
    step's cost does not depend on them), as `scst.SelfCritical` and `fit` take them: sample with
    gradients, reward the samples, the mean baseline, policy loss, backward, Adam. Each step takes new
    images, as in a first epoch, so its reward weighs their references too."""
    references, vocab = load_references(paths), Vocabulary.load(paths.reward_vocab)
    reward = reward_class(setup)(references)
    device = setup.torch_device()
    torch.manual_seed(setup.seed)
    model = Captioner.build(ModelParams(decoder=decoder), len(vocab)).to(device).train()
    side = model.config["image_size"]
    with torch.no_grad():
        shape = model.encoder.cnn(torch.zeros(2, 3, side, side, device=device)).shape[1:]  # pooled (F,) or grid (P, F)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=setup.scst.lr)
    generator = torch.Generator(device).manual_seed(setup.seed)
    ids = list(references)
    images, samples = setup.scst.batch_size, setup.scst.samples

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def step(number: int) -> dict:
        batch = [ids[(number * images + j) % len(ids)] for j in range(images)]
        cached = torch.randn(images, *shape, device=device, generator=generator)
        start = sync()
        features = model.encoder.head(cached)
        sampled, log_probs, mask = model.decoder.sample(features, vocab.start_id, vocab.end_id, samples, generator,
                                                        setup.scst.max_length)
        sampled_at = sync()
        captions = [words(vocab, row) for row in sampled.tolist()]
        rewards = reward.scores([i for i in batch for _ in range(samples)], captions)
        rewarded_at = time.perf_counter()
        advantage = advantages(torch.from_numpy(rewards).float().view(images, samples)).view(-1).to(device)
        loss = policy_loss(log_probs, mask, advantage)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        end = sync()
        return {"step": sampled_at - start + end - rewarded_at, "reward": rewarded_at - sampled_at,
                "words": float(mask.sum()) / len(captions)}

    step(0)  # first-call costs out of the timed steps
    watch = Stopwatch()
    steps = [step(number) for number in range(1, setup.scst_steps + 1)]
    median = lambda key: sorted(s[key] for s in steps)[len(steps) // 2]  # noqa: E731
    return {**watch.stop(), "step_seconds": median("step"), "reward_seconds": median("reward"),
            "words": sum(s["words"] for s in steps) / len(steps), "steps": len(steps),
            "images_per_step": images, "samples": samples}


def run_imports_only(paths: Paths, setup: Setup) -> dict:
    """Nothing: the RSS of a process that has only imported torch, torchvision and captioning,
    which every other piece's peak includes."""
    return {"seconds": 0.0, "other_load": 0.0}


# ---- report -----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: str) -> str:
    gpu = f"{torch.cuda.get_device_name(torch.device(device))}; " if device.startswith("cuda") else ""
    return (f"{gpu}{len(os.sched_getaffinity(0))} CPUs usable ({os.cpu_count()} online), {cpu_model()}; "
            f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), Pillow {PIL.__version__}, "
            f"Python {platform.python_version()}; {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")


def contention(results: dict) -> str:
    loads = ", ".join(f"{name} {r['other_load']:.2f}" for name, r in results.items())
    contended = [name for name, r in results.items() if r["other_load"] >= QUIET_LOAD]
    note = f" CONTENDED (figures unreliable): {', '.join(contended)}." if contended else " All quiet."
    return f"Cores used by other processes during each piece: {loads}.{note}\n"


def verdict(ratio: float, target: float) -> str:
    return f">= {target:g}x: {'met' if ratio >= target else 'NOT met'}"


def size_rows(setup: Setup, r: dict) -> list[tuple[str, ...]]:
    """The rows of the pieces run at `setup.image_size`, from `r` (piece name -> result; a row is
    left out when a piece it needs did not run)."""
    size = f"{setup.image_size} px"
    rows = []
    if {"seed_style", "ours"} <= r.keys():
        seed, ours = r["seed_style"], r["ours"]
        epoch_ratio = seed["seconds"] / ours["seconds"]
        rows += [
            (f"Train epoch, s ({seed['images']} images, {seed['captions']} captions, frozen {setup.backbone}); "
             "A seed-style loop, B `fit`", f"{seed['seconds']:.1f}", f"{ours['seconds']:.1f}", f"{epoch_ratio:.2f}x",
             verdict(epoch_ratio, 5)),
            ("Train throughput, images/s", f"{seed['images'] / seed['seconds']:.1f}",
             f"{ours['images'] / ours['seconds']:.1f}", f"{epoch_ratio:.2f}x", ""),
            ("Train steps/s", f"{seed['steps'] / seed['seconds']:.2f}", f"{ours['steps'] / ours['seconds']:.2f}",
             "", ""),
            ("Train steps per epoch (captions per step: 128 vs ~130)", str(seed["steps"]), str(ours["steps"]), "", ""),
            (f"Final train loss (mean of last {LAST_STEPS} steps)", f"{seed['final_loss']:.3f}",
             f"{ours['final_loss']:.3f}", "", "comparable"),
            ("Train epoch peak RSS, MiB: main process (DataLoader worker)",
             f"{seed['rss_mib']:.0f} ({seed['workers_rss_mib']:.0f})",
             f"{ours['rss_mib']:.0f} ({ours['workers_rss_mib']:.0f})", "", ""),
        ]
    if {"seed_style", "ours_cached"} <= r.keys():
        seed, cached = r["seed_style"], r["ours_cached"]
        ratio = seed["seconds"] / cached["seconds"]
        with_extraction = seed["seconds"] / (cached["seconds"] + cached["extract_seconds"])
        rows += [
            ("Train epoch, s; A seed-style loop, B `fit` on cached features (features stage)",
             f"{seed['seconds']:.1f}", f"{cached['seconds']:.1f}", f"{ratio:.2f}x", verdict(ratio, 5)),
            ("Final train loss of B on cached features (mean of last steps)", f"{seed['final_loss']:.3f}",
             f"{cached['final_loss']:.3f}", "", "comparable"),
            (f"One-off feature extraction of B, s ({cached['extracted']} train + val images, once per image)",
             "", f"{cached['extract_seconds']:.1f}", f"{with_extraction:.2f}x incl. it", ""),
            ("Feature extraction of B, images/s (JPEG decoding in the DataLoader included)", "",
             f"{cached['extracted'] / cached['extract_seconds']:.1f}", "", ""),
        ]
    if {"seed_style", "ours_cpi1"} <= r.keys():
        seed, ours1 = r["seed_style"], r["ours_cpi1"]
        rows.append(
            ("Extra: B with `captions_per_image: 1` (params.yaml), s/epoch; 1/5 of the captions per epoch, "
             f"loss {ours1['final_loss']:.3f} after {ours1['steps']} steps",
             f"{seed['seconds']:.1f}", f"{ours1['seconds']:.1f}", f"{seed['seconds'] / ours1['seconds']:.2f}x",
             "not like for like"))
    # The target compares with the seed's way (its sample loop, one image at a time); ours at
    # batch 1 is the same code as B with batching alone taken away.
    for kind, single, batched, target, a_name in (
            ("Greedy", "eval_seed_single", "eval_batched", 10, "the seed's loop (one image at a time, `sample`)"),
            ("Greedy", "eval_single", "eval_batched", None, "`caption_images` at batch 1"),
            (f"Beam-search (beam {setup.beam_size})", "eval_beam_single", "eval_beam_batched", None,
             "`caption_images` at batch 1")):
        if not {single, batched} <= r.keys():
            continue
        a, b = r[single], r[batched]
        ratio = a["seconds"] / b["seconds"]
        same = sum(x == y for x, y in zip(a["captions"], b["captions"]))
        rows += [
            (f"{kind} captioning, captions/s ({b['images']} test images); "
             f"A {a_name}, B `caption_images` at batch {setup.eval_batch}",
             f"{a['images'] / a['seconds']:.1f}", f"{b['images'] / b['seconds']:.1f}", f"{ratio:.2f}x",
             verdict(ratio, target) if target else ""),
            (f"{kind} captioning: identical captions, A vs B", "", f"{same}/{len(b['captions'])}", "", "all"),
            (f"{kind} captioning peak RSS, MiB: main process", f"{a['rss_mib']:.0f}", f"{b['rss_mib']:.0f}", "", ""),
        ]
    if {"eval_batched", "eval_beam_batched"} <= r.keys():
        greedy, beam = r["eval_batched"], r["eval_beam_batched"]
        rows.append((f"Batched captioning, s for {beam['images']} images: A greedy, B beam {setup.beam_size}",
                     f"{greedy['seconds']:.2f}", f"{beam['seconds']:.2f}",
                     f"{greedy['seconds'] / beam['seconds']:.2f}x", ""))
    return [(f"{size}: {measure}", *cells) for measure, *cells in rows]


def shared_rows(setup: Setup, r: dict) -> list[tuple[str, ...]]:
    """The rows of the pieces that do not depend on the input size (resize, memory, scaling)."""
    rows = []
    if {"resize_single", "resize_ours"} <= r.keys():
        resize_ratio = r["resize_ours"]["images"] / r["resize_ours"]["seconds"] / (
            r["resize_single"]["images"] / r["resize_single"]["seconds"])
        rows.append(
            (f"Resize to {RESIZE_SIDE} px, img/s ({r['resize_ours']['images']} raw images); "
             "A single-process Pillow loop, B `resize_all(workers=0)`",
             f"{r['resize_single']['images'] / r['resize_single']['seconds']:.1f}",
             f"{r['resize_ours']['images'] / r['resize_ours']['seconds']:.1f}", f"{resize_ratio:.2f}x",
             verdict(resize_ratio, 1.7)))
    if "imports_only" in r:
        rows.append(("Peak RSS, MiB, of a process that only imports torch, torchvision, captioning (in every RSS above)",
                     "", f"{r['imports_only']['rss_mib']:.0f}", "", ""))
    rows += reward_rows(setup, r)
    scaled = [r[name] for name in scale_names(setup) if name in r]
    if scaled:
        first = scaled[0]
        first_per_image = first["seconds"] / first["images"]
        for run in scaled:
            per_image = run["seconds"] / run["images"]
            rows.append(
                (f"Scaling of B ({setup.scale_image_size} px, from images): one epoch of {run['images']} images; "
                 f"B s per epoch (ms per image), peak RSS MiB; A/B: ms per image at N={first['images']} over this",
                 "", f"{run['seconds']:.1f} s ({per_image * 1000:.2f} ms), {run['rss_mib']:.0f} MiB",
                 f"{first_per_image / per_image:.2f}x", "~1x (linear)" if run is not first else ""))
    return rows


def reward_rows(setup: Setup, r: dict) -> list[tuple[str, ...]]:
    """The rows of the self-critical pieces."""
    rows = []
    if "reward_step" in r:
        w = r["reward_step"]
        ratio = w["single_seconds"] / w["batched_seconds"]
        rows += [
            (f"SCST reward, ms for one step's {w['captions']} captions against their images' references "
             f"(document frequencies of {w['images']} images); A one caption at a time (`CiderD.score`), "
             "B batched (`CiderD.scores`)", f"{w['single_seconds'] * 1000:.1f}", f"{w['batched_seconds'] * 1000:.1f}",
             f"{ratio:.1f}x", ""),
            ("SCST reward, ms: B with the images' references not yet weighed (each image's first step)", "",
             f"{w['cold_seconds'] * 1000:.1f}", "", ""),
            ("SCST reward: the document frequencies, s (`CiderD(references)`)", "",
             f"{w['frequencies_seconds']:.2f}", "", ""),
            ("SCST reward: largest difference between A's and B's rewards", "", f"{w['max_difference']:.1e}", "",
             "<= 1e-12"),
        ]
    for decoder in DECODERS:
        if f"scst_step_{decoder}" in r:
            s = r[f"scst_step_{decoder}"]
            ratio = s["step_seconds"] / s["reward_seconds"]
            rows.append(
                (f"SCST step, {decoder} decoder, ms ({s['images_per_step']} images x {s['samples']} samples of "
                 f"{s['words']:.1f} words, median of {s['steps']} steps); A the step without its reward (sample, "
                 "policy loss, backward, Adam), B the reward of its samples", f"{s['step_seconds'] * 1000:.1f}",
                 f"{s['reward_seconds'] * 1000:.1f}", f"{ratio:.1f}x", verdict(ratio, 1)))
    return rows


def table(setups: list[Setup], r: dict) -> str:
    """The markdown table of the results `r` (label -> result; see `schedule`): each input size's
    rows, then the shared ones."""
    rows = [("Measure", "A: baseline", "B: ours", "A/B", "Target")]
    for setup in setups:
        suffix = f"@{setup.image_size}"
        rows += size_rows(setup, {label.removesuffix(suffix): v for label, v in r.items() if label.endswith(suffix)})
    rows += shared_rows(setups[0], r)
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def scale_names(setup: Setup) -> list[str]:
    return [f"scale_{n}" for n in setup.scale_sizes]


# Pieces that caption with the model the "ours" piece trains and saves.
NEEDS_MODEL = ("eval_seed_single", "eval_single", "eval_batched", "eval_beam_single", "eval_beam_batched")
# Pieces that read the synthetic references alone (`prepare_references`), no images.
REWARD_PIECES = ("reward_step", *(f"scst_step_{decoder}" for decoder in DECODERS))


def sized_pieces(paths: Paths, setup: Setup) -> dict:
    """The pieces that run once per input size, at `setup.image_size`, in the order they run."""
    return {
        "seed_style": (run_seed_style, paths, setup),
        "ours": (run_ours, paths, setup, setup.n_train, setup.image_size, 0, True),  # saves the eval model
        "ours_cpi1": (run_ours, paths, setup, setup.n_train, setup.image_size, 1),
        "ours_cached": (run_ours_cached, paths, setup),
        "eval_seed_single": (run_caption_seed_style, paths, setup),
        "eval_single": (run_caption, paths, setup, 1),
        "eval_batched": (run_caption, paths, setup, setup.eval_batch),
        "eval_beam_single": (run_caption, paths, setup, 1, setup.beam_size),
        "eval_beam_batched": (run_caption, paths, setup, setup.eval_batch, setup.beam_size),
    }


def shared_pieces(paths: Paths, setup: Setup) -> dict:
    """The pieces that do not depend on the input size: they run once."""
    return {
        "imports_only": (run_imports_only, paths, setup),
        "resize_single": (run_resize_single, paths, setup),
        "resize_ours": (run_resize_ours, paths, setup),
        **{name: (run_ours, paths, setup, n, setup.scale_image_size)
           for name, n in zip(scale_names(setup), setup.scale_sizes)},
        "reward_step": (run_reward, paths, setup),
        **{f"scst_step_{decoder}": (run_scst_step, paths, setup, decoder) for decoder in DECODERS},
    }


def schedule(paths: Paths, setups: list[Setup], names: list[str]) -> dict:
    """label -> piece for the named pieces, in the order they run: the import-only process, each
    input size's pieces (labelled name@size), then resize, scaling and the self-critical pieces."""
    shared = {name: piece for name, piece in shared_pieces(paths, setups[0]).items() if name in names}
    plan = {name: shared.pop(name) for name in ("imports_only",) if name in shared}
    for setup in setups:
        plan.update({f"{name}@{setup.image_size}": piece for name, piece in sized_pieces(paths, setup).items()
                     if name in names})
    return {**plan, **shared}


def warm_file_cache(paths: Paths, n: int) -> None:
    # Both resize runs then read the raw JPEGs from the page cache: neither pays the first read.
    for record in read_split(paths.raw, "train").images[:n]:
        (images_dir(paths.raw, "train") / record["file_name"]).read_bytes()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=Setup.n_train, help="N: train images of the epoch runs")
    parser.add_argument("--image-sizes", default=",".join(map(str, IMAGE_SIZES)),
                        help="network input sides of the epoch and captioning comparisons, comma-separated")
    parser.add_argument("--n-test", type=int, default=Setup.n_test, help="test images of the captioning runs")
    parser.add_argument("--scale-sizes", default=",".join(map(str, Setup.scale_sizes)),
                        help="train images of the scaling runs, comma-separated")
    parser.add_argument("--num-workers", type=int, default=Setup.num_workers, help="DataLoader workers, both loops")
    parser.add_argument("--device", default=Setup.device, help="where the model pieces run: cpu | cuda")
    parser.add_argument("--backbone", default=Setup.backbone, help="the frozen torchvision ResNet, e.g. resnet152")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA, both sides (no-op on CPU)")
    parser.add_argument("--attempts", type=int, default=2, help="runs of a piece while other processes use the CPU")
    parser.add_argument("--max-wait", type=float, default=60, help="seconds to wait for a quiet machine per run")
    parser.add_argument("--only", help="comma-separated pieces to run (default: all), e.g. "
                                       "eval_beam_single,eval_beam_batched; a captioning piece brings `ours`")
    parser.add_argument("--reward-images", type=int, default=Setup.reward_images,
                        help="train images whose references give the SCST reward's document frequencies")
    parser.add_argument("--reward-module", default="",
                        help="time the CiderD of this file instead of captioning.reward's (another version of it)")
    parser.add_argument("--json", help="also write the raw results (label -> measurements) to this file")
    args = parser.parse_args(argv)
    setup = dataclasses.replace(Setup(), n_train=args.n_train, n_test=args.n_test,
                                scale_sizes=tuple(int(n) for n in args.scale_sizes.split(",")),
                                num_workers=args.num_workers, device=args.device, backbone=args.backbone,
                                bf16=args.bf16, reward_images=args.reward_images, reward_module=args.reward_module)
    setups = [dataclasses.replace(setup, image_size=int(size)) for size in args.image_sizes.split(",")]
    every = [*sized_pieces(Paths(Path()), setup), *shared_pieces(Paths(Path()), setup)]
    names = every if not args.only else args.only.split(",")
    unknown = set(names) - set(every)
    if unknown:
        parser.error(f"--only: unknown pieces {', '.join(sorted(unknown))} (known: {', '.join(every)})")
    if set(names) & set(NEEDS_MODEL):
        names.append("ours")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="caption-bench-") as tmp:
        paths = Paths(Path(tmp))
        if set(names) - set(REWARD_PIECES):
            prepare_data(paths, setup, scaling=bool(set(names) & set(scale_names(setup))))
            warm_file_cache(paths, setup.n_train)
        if set(names) & set(REWARD_PIECES):
            prepare_references(paths, setup)
        print(f"[bench] data ready in {time.perf_counter() - started:.0f} s: {setup}, "
              f"input sides {args.image_sizes} px", flush=True)
        results = {label: measured(label, piece, args.attempts, args.max_wait)
                   for label, piece in schedule(paths, setups, names).items()}
    print(f"\n[bench] total {time.perf_counter() - started:.0f} s\n")
    print(f"Machine: {machine(setup.device)}\n")
    print(contention(results))
    print(table(setups, results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
