"""Self-critical sequence training (Rennie et al., CVPR 2017): the policy gradient of sampled
captions, each weighed by its CIDEr-D reward (`reward.CiderD`) minus a baseline.

Two baselines: `greedy`, the reward of the image's greedy caption (the paper's), and `mean`, the
mean reward of the image's other samples (Luo 2020, "A Better Variant of Self-Critical Sequence
Training"), which needs no greedy decoding and at least two samples an image.

`SelfCritical` is the `training.Objective` of the scst stage: `training.fit` runs it as it runs
cross-entropy, so resume, DDP, bf16 and the epoch kept by validation work the same way.
"""

from __future__ import annotations

import dataclasses
import random

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from captioning.accel import Runtime
from captioning.data import CaptionDataset
from captioning.model import Captioner
from captioning.params import ScstParams
from captioning.reward import CiderD
from captioning.text import Vocabulary
from captioning.training import Objective, TrainingData


def advantages(rewards: torch.Tensor, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) rewards of K samples for each of B images -> their advantages: minus the greedy
    caption's reward (`greedy`, (B,)), or without it minus the mean of the image's other samples."""
    if greedy is not None:
        return rewards - greedy[:, None]
    samples = rewards.size(1)
    if samples < 2:
        raise ValueError("the mean baseline needs at least 2 samples an image")
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (samples - 1)


def policy_loss(log_probs: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """The negative advantage-weighted log-likelihood of the sampled captions: `log_probs` and
    `mask` (N, L) from `CaptionSearch.sample`, `advantage` (N,) (flattened, image by image),
    averaged over the words the captions hold."""
    mask = mask.to(log_probs.dtype)
    return -(advantage.detach()[:, None] * log_probs * mask).sum() / mask.sum().clamp(min=1)


def words(vocab: Vocabulary, ids: list[int]) -> str:
    """Ids after <start> -> the tokens the reward compares, up to and including the first <end>:
    ending a caption where its references end is part of what scores."""
    end = ids.index(vocab.end_id) + 1 if vocab.end_id in ids else len(ids)
    return " ".join(vocab.words[i] for i in ids[:end])


def reward_for(dataset: CaptionDataset, vocab: Vocabulary) -> CiderD:
    """CIDEr-D against each train image's references (keyed by dataset index), with the
    document frequencies of all of them, in the tokens samples are made of (<unk>, <end>)."""
    return CiderD({i: [words(vocab, c.tolist()[1:]) for c in captions] for i, captions in enumerate(dataset.captions)})


class Indexed(Dataset):
    """A train dataset's items as (input, index, item seed): a step needs which image it is (for
    its references) and a seed for its samples, not its captions."""

    def __init__(self, dataset: CaptionDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, item_seed = item
        return self.dataset.input(index, random.Random(item_seed)), index, item_seed


def scst_data(data: TrainingData, settings: ScstParams) -> TrainingData:
    """Cross-entropy's `TrainingData` as self-critical steps read it: images (or their cached
    features), `settings.batch_size` a step; validation unchanged."""
    return dataclasses.replace(data, train=Indexed(data.train), images_per_batch=settings.batch_size,
                               collate=default_collate)


class Policy(nn.Module):
    """The captioner as one self-critical forward: inputs -> (decoder input, sampled ids,
    log-probabilities, mask). DDP wraps this, so the gradients of the samples are averaged."""

    def __init__(self, model: Captioner, cached: bool, vocab: Vocabulary, settings: ScstParams):
        super().__init__()
        self.model, self.cached, self.vocab, self.settings = model, cached, vocab, settings

    def forward(self, inputs: torch.Tensor, generator: torch.Generator):
        features = self.model.encoder.head(inputs) if self.cached else self.model.encoder(inputs)
        return (features, *self.model.decoder.sample(features, self.vocab.start_id, self.vocab.end_id,
                                                     self.settings.samples, generator, self.settings.max_length))


class SelfCritical(Objective):
    """One self-critical step: sample `settings.samples` captions an image, reward each by
    `reward`, subtract the baseline, and weigh each caption's log-likelihood by what is left."""

    def __init__(self, model: Captioner, vocab: Vocabulary, reward: CiderD, settings: ScstParams,
                 runtime: Runtime, cached: bool):
        self.model, self.vocab, self.reward, self.settings = model, vocab, reward, settings
        self.runtime, self.cached = runtime, cached
        self.last: dict[str, torch.Tensor] = {}

    def module(self, model: Captioner) -> nn.Module:
        return Policy(model, self.cached, self.vocab, self.settings)

    def __call__(self, net: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, index, seeds = batch
        device = self.runtime.device
        inputs = inputs.to(device, non_blocking=True)
        inputs = inputs if self.cached else self.runtime.channels_last(inputs)
        # The samples are a function of the batch's items, so a resumed run draws the same ones.
        generator = torch.Generator(device).manual_seed(int(seeds[0]))
        features, ids, log_probs, mask = net(inputs, generator)
        images = index.tolist()
        rewards = self.rewards([i for i in images for _ in range(self.settings.samples)], ids)
        rewards = rewards.view(len(images), self.settings.samples)
        greedy = None
        if self.settings.baseline == "greedy":
            with torch.no_grad():
                best = self.model.decoder.greedy(features.detach(), self.vocab.end_id)[:, 1:]
            greedy = self.rewards(images, best[:, : self.settings.max_length])
        advantage = advantages(rewards, greedy)
        self.last = {"reward": rewards.mean(), "baseline": (rewards - advantage).mean(),
                     "advantage": advantage.mean(), "advantage_sd": advantage.std()}
        loss = policy_loss(log_probs, mask, advantage.view(-1).to(device))
        return loss, loss

    def rewards(self, images: list[int], ids: torch.Tensor) -> torch.Tensor:
        captions = [words(self.vocab, row) for row in ids.tolist()]
        return torch.from_numpy(self.reward.scores(images, captions)).float()

    def row(self, loss: float) -> dict[str, float]:
        return {k: float(v) for k, v in self.last.items()}
