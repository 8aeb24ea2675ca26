"""The seed's CNN-LSTM ("Show and Tell") captioner.

Encoder: a torchvision ResNet without its fc layer, then Linear + BatchNorm1d to `embed_size`.
Decoder: Embedding, LSTM, Linear; the image feature is the LSTM's first input step, then the
caption's tokens (teacher forcing). Greedy decoding feeds back the argmax word.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioning.params import ModelParams


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for but are not on this machine."""


def load_backbone(params: ModelParams) -> nn.Module:
    """The torchvision ResNet named by `params.backbone`, with ImageNet weights if asked for.

    Weights come from `params.weights_path` or the torch hub cache; nothing is downloaded here,
    so an offline machine gets a clear message rather than a network error deep in torchvision.
    """
    resnet = getattr(torchvision.models, params.backbone)(weights=None)
    if params.pretrained:
        resnet.load_state_dict(_pretrained_state(params))
    return resnet


def _pretrained_state(params: ModelParams) -> dict:
    if params.weights_path:
        path = Path(params.weights_path)
        if not path.is_file():
            raise PretrainedWeightsError(f"model.weights_path: no file at {path}")
        return torch.load(path, map_location="cpu", weights_only=True)
    weights = torchvision.models.get_model_weights(params.backbone).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        raise PretrainedWeightsError(
            f"model.pretrained is true but the ImageNet weights of {params.backbone} are not in the "
            f"torch hub cache ({cached}). Either copy them there (on a machine with internet: "
            f"python -c \"import torchvision; torchvision.models.{params.backbone}(weights='DEFAULT')\"), "
            f"set model.weights_path to a local copy of {Path(weights.url).name}, "
            f"or set model.pretrained: false to train from scratch."
        )
    return torch.load(cached, map_location="cpu", weights_only=True)


def backbone_from_state(params: ModelParams, state: dict) -> nn.Module:
    """The torchvision ResNet named by `params.backbone` with `state` (the pretrain stage's
    output: every layer but fc) loaded."""
    backbone = getattr(torchvision.models, params.backbone)(weights=None)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise ValueError(f"backbone weights do not fit {params.backbone}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}; rerun the pretrain stage")
    return backbone


def trunk(backbone: nn.Module) -> nn.Sequential:
    """A torchvision ResNet without its fc layer: images (B, 3, H, W) -> pooled (B, F, 1, 1)."""
    return nn.Sequential(*list(backbone.children())[:-1])


class Encoder(nn.Module):
    def __init__(self, backbone: nn.Module, embed_size: int, train_backbone: bool):
        super().__init__()
        self.backbone = trunk(backbone)  # drop fc, keep avgpool
        self.feature_size = backbone.fc.in_features
        self.linear = nn.Linear(self.feature_size, embed_size)
        self.batch_norm = nn.BatchNorm1d(embed_size, momentum=0.01)
        self.train_backbone = train_backbone
        self.backbone.requires_grad_(train_backbone)

    def train(self, mode: bool = True):
        # A frozen backbone stays in eval mode: under no_grad its BatchNorm would still update
        # running statistics in train mode.
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()
        return self

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, feature_size) pooled backbone features."""
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            return self.backbone(images).flatten(1)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, feature_size) -> (B, embed_size)."""
        return self.batch_norm(self.linear(pooled))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(images))


class Decoder(nn.Module):
    def __init__(self, embed_size: int, hidden_size: int, vocab_size: int, num_layers: int,
                 max_seq_len: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.max_seq_len = max_seq_len
        # Forget-gate bias 1 (Jozefowicz et al., 2015): the image arrives only at step 0, and the
        # LSTM must remember it to the last object word; the default 0 forgets it early in training.
        with torch.no_grad():
            for name, bias in self.lstm.named_parameters():
                if name.startswith("bias_ih"):
                    bias[hidden_size:2 * hidden_size].fill_(1.0)  # gate order: input, forget, cell, output

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of the packed targets.

        features (N, E); captions (N, L) padded ids starting with <start>; lengths (N,) sorted
        descending. Returns (sum(lengths), V), in the order of
        `pack_padded_sequence(captions, lengths, batch_first=True).data`.
        """
        embeddings = self.embedding(captions)  # (N, L, E)
        # The image is step 0; the last token's embedding is never an input (nothing follows <end>).
        inputs = torch.cat((features.unsqueeze(1), embeddings), 1)  # (N, L+1, E)
        packed = pack_padded_sequence(inputs, lengths.cpu(), batch_first=True)
        hiddens, _ = self.lstm(packed)
        return self.linear(hiddens.data)  # (sum(lengths), V)

    @torch.no_grad()
    def greedy(self, features: torch.Tensor, end_id: int) -> torch.Tensor:
        """(B, E) features -> (B, max_seq_len) argmax ids; the first predicted id is <start>.

        Stops early once every caption has produced <end> (after <start>).
        """
        inputs, states = features.unsqueeze(1), None  # (B, 1, E)
        ids = []
        done = torch.zeros(features.size(0), dtype=torch.bool, device=features.device)
        for step in range(self.max_seq_len):
            hiddens, states = self.lstm(inputs, states)  # (B, 1, H)
            predicted = self.linear(hiddens.squeeze(1)).argmax(1)  # (B,)
            ids.append(predicted)
            if step > 0:
                done |= predicted == end_id
                if bool(done.all()):
                    break
            inputs = self.embedding(predicted).unsqueeze(1)  # (B, 1, E)
        return torch.stack(ids, 1)


class Captioner(nn.Module):
    """Encoder + decoder, rebuilt from `config` alone (the checkpoint stores it)."""

    def __init__(self, config: dict, backbone: nn.Module | None = None):
        super().__init__()
        self.config = dict(config)
        params = ModelParams(**{k: v for k, v in config.items() if k != "vocab_size"})
        if backbone is None:  # weights come from a checkpoint: no need for ImageNet ones
            backbone = getattr(torchvision.models, params.backbone)(weights=None)
        self.encoder = Encoder(backbone, params.embed_size, params.train_backbone)
        self.decoder = Decoder(params.embed_size, params.hidden_size, config["vocab_size"],
                               params.num_layers, params.max_seq_len)

    @classmethod
    def build(cls, params: ModelParams, vocab_size: int, backbone_state: dict | None = None) -> "Captioner":
        """A new model for training, its backbone from `backbone_state` (the pretrain stage's
        output) or else as `params.pretrained` says."""
        backbone = load_backbone(params) if backbone_state is None else backbone_from_state(params, backbone_state)
        return cls({**asdict(params), "vocab_size": vocab_size}, backbone=backbone)

    def forward(self, inputs, captions, lengths, image_index, pooled: bool = False):
        """Logits for the packed targets; `image_index[n]` is the image of caption n.

        `inputs` are images (B, 3, S, S), or with `pooled` the backbone's cached pooled output
        (B, F). The encoder runs once per image, however many captions it has in the batch.
        """
        features = (self.encoder.head if pooled else self.encoder)(inputs)[image_index]  # (N, E)
        return self.decoder(features, captions, lengths)

    @torch.no_grad()
    def caption_ids(self, images: torch.Tensor, end_id: int) -> torch.Tensor:
        return self.decoder.greedy(self.encoder(images), end_id)
