"""Typed, frozen params: one dataclass per params.yaml section.

The dataclasses hold each knob's default value and params.yaml spells every one of them out (DVC
sees only what the file says); tests/test_params.py fails on any key or value that differs.

Unknown or misspelt keys, wrong types and out-of-range values are rejected before any work
starts, with the key named (``train.lr``) and what is allowed. Each stage asks for the section(s)
it reads, so a stage never depends on knobs it does not use.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from captioning.errors import UserError

SOURCES = ("synthetic", "coco2014", "coco2017", "flickr8k", "flickr30k", "local")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
WEIGHTS_VERSIONS = ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2")
DEVICES = ("auto", "cpu", "cuda", "mps")
DECODERS = ("lstm", "attention")
GRID_LAYERS = ("layer3", "layer4")  # the ResNet stages whose feature map the attention decoder can read
# Validation metrics the best epoch may be selected by; all but val_loss are better when higher.
# "last" keeps the last epoch, as the seed does (it has no validation).
SELECT_METRICS = ("cider", "bleu_4", "grounded", "strict", "val_loss", "last")
LR_SCHEDULES = ("onecycle", "constant")
BASELINES = ("greedy", "mean")  # self-critical training's baselines (captioning.scst)
CPU_ISAS = ("avx2", "native")
# What the pipeline does with an image it cannot use: stop naming it, or skip it and report it.
BAD_IMAGE_POLICIES = ("error", "skip")


class ParamsError(UserError, ValueError):
    """A params value or key is wrong; the message names the key and the fix."""


@dataclass(frozen=True)
class DataParams:
    source: str = "synthetic"
    # synthetic: images per split (other sources ignore these and take their own split sizes)
    num_train: int = 12000
    num_val: int = 200
    num_test: int = 2000
    min_side: int = 300  # pixels, shortest allowed side of a generated image (COCO-like)
    max_side: int = 640
    captions_per_image: int = 5
    workers: int = 0  # processes for generation; 0 = one per core
    # real sources (everything but synthetic)
    max_images: int = 0  # per split, a subset drawn by `seed`; 0 = all
    images_dir: str = ""  # flickr8k, flickr30k, local: the folder holding the images
    annotations: str = ""  # local: COCO captions json, or Karpathy-format json with a split per image
    val_fraction: float = 0.05  # local with a COCO captions json: share of images for val
    test_fraction: float = 0.05  # ... and for test (seeded split)
    karpathy_json: str = ""  # coco/flickr: a local dataset_*.json instead of downloading caption_datasets.zip
    base_url: str = ""  # a mirror holding the archives under their own names; "" = the official hosts
    checksums: str = ""  # a JSON file of {archive: {size, checksum}} for a mirror's repacked archives
    on_bad_image: str = "error"  # error | skip: an image that is missing or cannot be decoded

    def check(self) -> None:
        _one_of("data.source", self.source, SOURCES)
        for key in ("num_train", "num_val", "num_test", "captions_per_image"):
            _at_least(f"data.{key}", getattr(self, key), 1)
        _at_least("data.min_side", self.min_side, 64)
        _at_least("data.max_side", self.max_side, self.min_side)
        _at_least("data.workers", self.workers, 0)
        _at_least("data.max_images", self.max_images, 0)
        for key in ("val_fraction", "test_fraction"):
            if not 0 < getattr(self, key) < 0.5:
                raise ParamsError(f"data.{key} must be between 0 and 0.5 (exclusive), got {getattr(self, key)!r}")
        _one_of("data.on_bad_image", self.on_bad_image, BAD_IMAGE_POLICIES)
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ParamsError(f"data.base_url must start with http:// or https://, got {self.base_url!r}")
        if self.source in ("flickr8k", "flickr30k", "local") and not self.images_dir:
            raise ParamsError(f"data.source {self.source} needs data.images_dir (its images cannot be "
                              "downloaded freely): the folder holding them")
        if self.source == "local" and not self.annotations:
            raise ParamsError("data.source local needs data.annotations: a COCO captions json, or a "
                              "Karpathy-format json with a split per image")


@dataclass(frozen=True)
class VocabParams:
    threshold: int = 1  # keep words seen at least this often in the train captions

    def check(self) -> None:
        _at_least("vocab.threshold", self.threshold, 1)


@dataclass(frozen=True)
class ResizeParams:
    # Not `size`: DVC leaves any key named size (or nfiles) out of its run-cache key, so a change
    # of it would restore another size's images (dvc/utils dict_filter, DVC 3.67).
    side: int = 256  # every image becomes side x side pixels (aspect not kept, as in Show and Tell)
    quality: int = 95  # JPEG quality of the resized copies
    workers: int = 0  # processes; 0 = one per core

    def check(self) -> None:
        _at_least("resize.side", self.side, 32)
        _between("resize.quality", self.quality, 50, 100)
        _at_least("resize.workers", self.workers, 0)


@dataclass(frozen=True)
class ModelParams:
    backbone: str = "resnet18"
    pretrained: bool = False  # ImageNet weights from the torch hub cache or `weights_path`
    weights_path: str = ""  # a torchvision state_dict file in inputs/model/; "" = the hub cache, else download
    # torchvision's name for the ImageNet weights: DEFAULT (its best), IMAGENET1K_V1 (what the seed's
    # pretrained=True loads), IMAGENET1K_V2 (resnet50 and larger)
    weights_version: str = "DEFAULT"
    train_backbone: bool = False  # False freezes the CNN after pretrain (the seed's setting)
    image_size: int = 32  # network input side; stored images are cropped/scaled to it
    # lstm: the seed's (the image is the LSTM's first input); attention: Show, Attend and Tell's
    # soft attention over a grid of the backbone's feature map (`grid_layer`)
    decoder: str = "lstm"
    # attention only: the ResNet stage whose output is the grid: layer3, (image_size / 16) ** 2
    # cells (2 x 2 at 32 px), or layer4, the last, (image_size / 32) ** 2 (one cell at 32 px, 7 x 7
    # at 224 px)
    grid_layer: str = "layer3"
    embed_size: int = 128
    hidden_size: int = 256
    num_layers: int = 1  # LSTM layers (lstm only: the attention decoder is one LSTMCell)
    attention_size: int = 128  # attention only: width of the attention scores' hidden layer
    max_seq_len: int = 20  # longest generated caption, in tokens

    def check(self) -> None:
        _one_of("model.backbone", self.backbone, BACKBONES)
        _one_of("model.weights_version", self.weights_version, WEIGHTS_VERSIONS)
        _one_of("model.decoder", self.decoder, DECODERS)
        _one_of("model.grid_layer", self.grid_layer, GRID_LAYERS)
        for key in ("embed_size", "hidden_size", "num_layers", "attention_size", "max_seq_len"):
            _at_least(f"model.{key}", getattr(self, key), 1)
        _at_least("model.image_size", self.image_size, 32)
        if self.decoder == "attention" and self.num_layers != 1:
            raise ParamsError(f"model.num_layers is {self.num_layers}, but the attention decoder is one LSTMCell: "
                              "set model.num_layers: 1, or model.decoder: lstm")
        if self.pretrained is False and self.weights_path:
            raise ParamsError(
                "model.weights_path is set but model.pretrained is false: "
                "set model.pretrained: true to load it, or clear model.weights_path"
            )


@dataclass(frozen=True)
class PretrainParams:
    epochs: int = 14  # visual-concept epochs over the train images; 0 = keep model.pretrained's weights
    batch_size: int = 128  # images per step
    lr: float = 0.004  # the peak rate under onecycle
    max_concepts: int = 1000  # most frequent caption words and word pairs to predict
    min_images: int = 5  # a concept must occur in this many train images
    schedule: str = "onecycle"  # learning rate: onecycle (warm-up, then annealed) | constant

    def check(self) -> None:
        _at_least("pretrain.epochs", self.epochs, 0)
        _at_least("pretrain.batch_size", self.batch_size, 2)  # BatchNorm needs 2 images a step
        _positive("pretrain.lr", self.lr)
        _at_least("pretrain.max_concepts", self.max_concepts, 1)
        _at_least("pretrain.min_images", self.min_images, 1)
        _one_of("pretrain.schedule", self.schedule, LR_SCHEDULES)


@dataclass(frozen=True)
class FeaturesParams:
    views: int = 1  # crops cached per train image: 1 = the centre crop; more adds random crops
    batch_size: int = 128  # images per forward pass

    def check(self) -> None:
        _at_least("features.views", self.views, 1)
        _at_least("features.batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class TrainParams:
    section: typing.ClassVar[str] = "train"
    epochs: int = 23
    batch_size: int = 128  # captions per step, as in the seed
    captions_per_image: int = 1  # captions drawn per image per epoch; 0 = all (CNN once per image)
    lr: float = 0.004
    schedule: str = "onecycle"  # learning rate: onecycle (as pretrain.schedule) | constant (the seed's)
    log_every: int = 10  # steps between loss/perplexity logs
    checkpoint_every: int = 200  # steps between resume checkpoints
    hflip: bool = False  # horizontal flip augmentation; it swaps "left of"/"right of"
    random_crop: bool = True
    # attention only: weight of the doubly stochastic attention regulariser (Xu et al.'s lambda)
    attention_reg: float = 1.0
    select_metric: str = "val_loss"  # val metric (of greedy captions) that picks the kept epoch
    patience: int = 0  # stop after this many epochs without improvement; 0 = never
    compile: bool = False  # torch.compile the model (pays a compile at start; for long GPU runs)
    processes: int = 1  # > 1: DistributedDataParallel over this many processes (one per GPU) via torchrun
    nodes: int = 1  # boxes training together (processes on each); > 1: CAPTIONING_RDZV_ENDPOINT on every box

    def check(self) -> None:
        _at_least("train.epochs", self.epochs, 1)
        _one_of("train.select_metric", self.select_metric, SELECT_METRICS)
        if self.select_metric == "last" and self.patience:
            raise ParamsError(f"train.patience is {self.patience}, but train.select_metric last never improves: "
                              "set train.patience: 0, or pick a metric")
        _at_least("train.patience", self.patience, 0)
        _at_least("train.batch_size", self.batch_size, 1)
        _at_least("train.captions_per_image", self.captions_per_image, 0)
        _positive("train.lr", self.lr)
        _one_of("train.schedule", self.schedule, LR_SCHEDULES)
        _at_least("train.attention_reg", self.attention_reg, 0)
        _at_least("train.log_every", self.log_every, 1)
        _at_least("train.checkpoint_every", self.checkpoint_every, 1)
        _at_least("train.processes", self.processes, 1)
        _at_least("train.nodes", self.nodes, 1)


@dataclass(frozen=True)
class ScstParams:
    """Self-critical fine-tuning of the cross-entropy checkpoint (captioning.scst)."""

    section: typing.ClassVar[str] = "scst"

    epochs: int = 0  # 0: the cross-entropy checkpoint goes to evaluate unchanged
    batch_size: int = 128  # images per step, each with `samples` sampled captions
    samples: int = 5  # captions sampled per image per step
    baseline: str = "mean"  # greedy: the greedy caption's reward | mean: the other samples' mean reward
    max_length: int = 20  # words sampled at most, <end> included
    lr: float = 5e-5
    schedule: str = "constant"  # as train.schedule
    select_metric: str = "cider"  # as train.select_metric; epoch 0 (the cross-entropy model) competes too
    patience: int = 0  # as train.patience
    log_every: int = 10  # steps between reward/baseline/advantage logs
    checkpoint_every: int = 200  # steps between resume checkpoints

    def check(self) -> None:
        _at_least("scst.epochs", self.epochs, 0)
        _at_least("scst.batch_size", self.batch_size, 1)
        _at_least("scst.samples", self.samples, 1)
        _one_of("scst.baseline", self.baseline, BASELINES)
        if self.baseline == "mean" and self.samples < 2:
            raise ParamsError(f"scst.samples is {self.samples}, but scst.baseline mean compares each sample with "
                              "the image's other samples: set scst.samples: 2 or more, or scst.baseline: greedy")
        _at_least("scst.max_length", self.max_length, 1)
        _positive("scst.lr", self.lr)
        _one_of("scst.schedule", self.schedule, LR_SCHEDULES)
        _one_of("scst.select_metric", self.select_metric, SELECT_METRICS)
        _at_least("scst.patience", self.patience, 0)
        _at_least("scst.log_every", self.log_every, 1)
        _at_least("scst.checkpoint_every", self.checkpoint_every, 1)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 64
    gallery_size: int = 24  # images shown in the sample gallery
    beam_size: int = 3  # captions kept per image while decoding; 1 = greedy
    # Beam search ranks a finished caption by its summed log-prob / length ** length_penalty:
    # 0 = raw sum (favours short captions), 1 = mean log-prob per token.
    length_penalty: float = 0.5
    registered_model: str = "captioner"  # the MLflow registered model every evaluated model is a version of

    def check(self) -> None:
        _at_least("evaluate.batch_size", self.batch_size, 1)
        _at_least("evaluate.beam_size", self.beam_size, 1)
        # Negative would favour short captions even more than 0 (and void beam search's stopping
        # bound); past 2, length wins over the words. The bounds also reject NaN and infinity.
        _between("evaluate.length_penalty", self.length_penalty, 0, 2)
        _at_least("evaluate.gallery_size", self.gallery_size, 0)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.registered_model):
            raise ParamsError(f"evaluate.registered_model is {self.registered_model!r}: use letters, digits, "
                              "'_', '.' and '-' (e.g. captioner-coco)")


@dataclass(frozen=True)
class ComputeParams:
    """Where and how the compute stages (pretrain, features, train, evaluate) run."""

    device: str = "auto"  # auto | cpu | cuda | mps
    num_workers: int = 1  # DataLoader worker processes (image decoding); no effect on results
    bf16: bool = True  # CUDA: bf16 autocast (and channels_last for the CNN); ignored elsewhere
    deterministic: bool = False  # CUDA: deterministic algorithms (slower); CPU runs repeat anyway
    # CPU kernels: native, the widest this CPU has (AVX-512 or AVX2), or avx2 on any x86-64 CPU:
    # the same bits on every machine with AVX2, but much slower on an AVX-512 CPU
    # (docs/reproducibility.md), which is why it is not the default
    cpu_isa: str = "native"

    def check(self) -> None:
        _one_of("compute.device", self.device, DEVICES)
        _at_least("compute.num_workers", self.num_workers, 0)
        _one_of("compute.cpu_isa", self.cpu_isa, CPU_ISAS)


@dataclass(frozen=True)
class Params:
    seed: int = 42
    data: DataParams = DataParams()
    vocab: VocabParams = VocabParams()
    resize: ResizeParams = ResizeParams()
    model: ModelParams = ModelParams()
    pretrain: PretrainParams = PretrainParams()
    features: FeaturesParams = FeaturesParams()
    train: TrainParams = TrainParams()
    scst: ScstParams = ScstParams()
    evaluate: EvaluateParams = EvaluateParams()
    compute: ComputeParams = ComputeParams()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flatten(nested: dict, prefix: str = "") -> dict[str, object]:
    """{'train': {'lr': 0.001}} -> {'train.lr': 0.001}: the dotted keys DVC and MLflow use."""
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def nest(flat: dict[str, object]) -> dict:
    """flatten's inverse."""
    out: dict = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return out


def parse_params(raw: dict) -> Params:
    """Build and check `Params` from a plain dict (the content of params.yaml)."""
    params = _build(Params, raw, prefix="")
    for field in dataclasses.fields(Params):
        section = getattr(params, field.name)
        if dataclasses.is_dataclass(section):
            section.check()
    return params


def load_params(path: str | Path = "params.yaml", reads: tuple[str, ...] | None = None) -> Params:
    """The params file, checked whole; with `reads` (a stage's PARAMS), narrowed to those."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: no params file; run from the repo root or pass --params") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    try:
        params = parse_params(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
    return params if reads is None else Declared(params, reads)


def check_inputs(paths: dict[str, str], folder: str | Path) -> None:
    """Files named by params (`{"data.annotations": path}`) must be inside `folder`, which the
    stage reading them depends on: DVC cannot depend on a path that a param may leave empty, and
    a dependency on the path alone would miss a file changed under the same name."""
    root = Path(os.path.abspath(folder))
    for key, value in paths.items():
        if value and not Path(os.path.abspath(value)).is_relative_to(root):
            raise ParamsError(f"{key}: {value} is outside {folder}/; copy or link it there, so that DVC "
                              f"reruns the stage when the file changes (inputs/README.md)")


class UndeclaredParamError(AttributeError):
    """A stage read a param it does not declare: a bug in the stage, not in params.yaml."""


class Declared:
    """`params` narrowed to what a stage declares it reads: whole sections (`train`, `seed`) or
    single keys (`model.backbone`), the same list as the stage's `params:` in dvc.yaml (a test
    keeps the two equal). Reading anything else raises, so no stage can depend on a param that
    DVC does not track for it."""

    def __init__(self, params, reads: tuple[str, ...], prefix: str = ""):
        self._params, self._reads, self._prefix = params, tuple(reads), prefix

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        key = self._prefix + name
        if key in self._reads:
            return getattr(self._params, name)
        if any(r.startswith(key + ".") for r in self._reads):
            return Declared(getattr(self._params, name), self._reads, key + ".")
        raise UndeclaredParamError(f"{key} is read but not declared: add it to the stage's PARAMS and to "
                                   "its params in dvc.yaml")

    def to_dict(self) -> dict:
        """The declared params only, nested as in params.yaml."""
        out: dict = {}
        for key in self._reads:
            if not key.startswith(self._prefix):
                continue
            *sections, name = key.removeprefix(self._prefix).split(".")
            value = self._params
            for part in (*sections, name):
                value = getattr(value, part)
            node = out
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return out


def _build(cls, raw, prefix: str):
    where = prefix.rstrip(".") or "params"
    if not isinstance(raw, dict):
        raise ParamsError(f"{where} must be a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ParamsError(f"unknown key '{prefix}{key}'{hint} (allowed: {', '.join(names)})")
        values[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**values)


_EXPONENT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        # PyYAML reads YAML 1.1, where a float needs a dot: `1e-06`, which is how
        # `dvc exp run -S train.lr=0.000001` writes it, comes back as a string.
        if isinstance(value, str) and _EXPONENT.fullmatch(value):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        raise NotImplementedError(f"{key}: union-typed params are not supported")
    raise NotImplementedError(f"{key}: unsupported params type {hint!r}")


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ParamsError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _at_least(key: str, value, low) -> None:
    if value < low:
        raise ParamsError(f"{key} must be >= {low}, got {value!r}")


def _positive(key: str, value) -> None:
    if not value > 0:  # also rejects NaN
        raise ParamsError(f"{key} must be > 0, got {value!r}")


def _between(key: str, value, low, high) -> None:
    if not low <= value <= high:
        raise ParamsError(f"{key} must be between {low} and {high}, got {value!r}")
