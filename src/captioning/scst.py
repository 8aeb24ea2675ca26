"""Self-critical sequence training (Rennie et al., CVPR 2017): the policy gradient of sampled
captions, each weighed by its reward minus a baseline.

Two baselines: `greedy`, the reward of the image's greedy caption (the paper's), and `mean`, the
mean reward of the image's other samples (Luo 2020, "A Better Variant of Self-Critical Sequence
Training"), which needs no greedy decoding and at least two samples an image.
"""

from __future__ import annotations

import torch

BASELINES = ("greedy", "mean")


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
