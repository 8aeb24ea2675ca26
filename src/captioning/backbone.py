"""The CNN side: torchvision ResNets, their ImageNet weights, and the trunk the captioner uses.

Kept apart from the captioner (`captioning.model`) so that the stages that only need the CNN
(weights, pretrain, features) do not depend on the decoder's code: editing a decoder must not
rerun a COCO-sized pretraining or feature extraction.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from captioning.errors import UserError
from captioning.io import file_digest, read_json
from captioning.params import BACKBONES, ModelParams


class WeightsError(UserError, ValueError):
    """Backbone weights that are missing, changed, or of another architecture."""


def resnet(name: str) -> nn.Module:
    """The torchvision ResNet `name` with random weights (drawn from torch's global RNG)."""
    return getattr(torchvision.models, name)(weights=None)


# ---- ImageNet weights (found or fetched by the weights stage: captioning.imagenet) --------------


def hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def architecture(state: dict) -> str | None:
    """Which torchvision ResNet a state_dict is the weights of (all layers but fc), if any."""
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("fc.")}
    for name in BACKBONES:
        with torch.device("meta"):  # shapes only: no memory, no random draws
            reference = resnet(name).state_dict()
        if shapes == {k: tuple(v.shape) for k, v in reference.items() if not k.startswith("fc.")}:
            return name
    return None


def load_weights(path: Path, backbone: str) -> dict:
    """The state_dict in `path`, refused unless it is `backbone`'s."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: the file is not a weights file
        raise WeightsError(f"{path}: not a PyTorch weights file ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state_dict (a mapping of tensor names to tensors)")
    found = architecture(state)
    if found is None:
        raise WeightsError(f"{path} holds the weights of no torchvision ResNet; model.backbone {backbone} needs "
                           f"{backbone}'s")
    if found != backbone:
        raise WeightsError(f"{path} holds {found} weights, but model.backbone is {backbone}: set model.backbone: "
                           f"{found}, or use {backbone}'s weights")
    return state


def recorded_weights(record_path: str | Path, backbone: str) -> dict | None:
    """The state_dict the weights stage recorded (None: not pretrained), checked against the record."""
    entry = read_json(record_path, missing="run the weights stage (dvc repro weights)")
    if not entry.get("pretrained"):
        return None
    path = Path(entry["weights_path"]) if entry["weights_path"] else hub_checkpoints() / entry["file"]
    if not path.is_file() or file_digest(path) != entry["sha256"]:
        raise WeightsError(f"{path}: {'gone' if not path.is_file() else 'changed'} since the weights stage "
                           f"recorded it in {record_path}: run `dvc repro -f weights`")
    return load_weights(path, backbone)


def backbone_from_state(params: ModelParams, state: dict) -> nn.Module:
    """The torchvision ResNet named by `params.backbone` with `state` (the pretrain stage's
    output: every layer but fc) loaded."""
    backbone = resnet(params.backbone)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise WeightsError(f"backbone weights do not fit {params.backbone}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}; rerun the pretrain stage")
    return backbone


def trunk(backbone: nn.Module) -> nn.Sequential:
    """A torchvision ResNet without its fc layer: images (B, 3, H, W) -> pooled (B, F, 1, 1)."""
    return nn.Sequential(*list(backbone.children())[:-1])


def grid_trunk(backbone: nn.Module, layer: str) -> nn.Sequential:
    """The trunk up to and including `layer` (`model.grid_layer`): images (B, 3, H, W) -> the
    feature map whose cells the attention decoder reads, (B, C, H/16, W/16) for layer3 and
    (B, C, H/32, W/32) for layer4. The layers keep `trunk`'s indices, so the weights keep their names."""
    names = [name for name, _ in backbone.named_children()]
    return trunk(backbone)[: names.index(layer) + 1]


def channels(backbone: nn.Module, layer: str) -> int:
    """C of `layer`'s output: the width of a grid cell (resnet18: 256 for layer3, 512 for layer4)."""
    return [m for m in getattr(backbone, layer)[-1].modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
