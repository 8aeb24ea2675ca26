"""The self-critical mechanism: sampling with log-probabilities, the baselines, the policy step."""

from __future__ import annotations

import pytest
import torch

from captioning.model import AttentionDecoder, Decoder
from captioning.scst import advantages, policy_loss

START, END, VOCAB = 1, 2, 12


def _decoder_and_features(kind: str, images: int = 3):
    torch.manual_seed(0)
    if kind == "lstm":
        return Decoder(8, 16, VOCAB, 1, max_seq_len=10), torch.randn(images, 8)
    return AttentionDecoder(6, 8, 16, 8, VOCAB, max_seq_len=10), torch.randn(images, 4, 6)


@pytest.mark.parametrize("kind", ["lstm", "attention"])
def test_samples_repeat_with_the_generator_and_their_log_probs_are_the_teacher_forced_ones(kind):
    decoder, features = _decoder_and_features(kind)
    ids, log_probs, mask = decoder.sample(features, START, END, 4, torch.Generator().manual_seed(7))
    again, _, _ = decoder.sample(features, START, END, 4, torch.Generator().manual_seed(7))
    assert ids.shape[0] == 12 and torch.equal(ids, again)
    forced, forced_mask = decoder.log_probs(features.repeat_interleave(4, 0), START, END, ids)
    assert torch.allclose(forced, log_probs, atol=1e-6) and torch.equal(forced_mask, mask)
    assert (log_probs <= 0).all() and log_probs.requires_grad


def test_the_mask_holds_the_words_up_to_and_including_the_first_end():
    decoder, features = _decoder_and_features("lstm", images=2)
    ids = torch.tensor([[5, END, 7, END], [5, 6, 7, 8]])
    _, mask = decoder.log_probs(features, START, END, ids)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]


@pytest.mark.parametrize("kind", ["lstm", "attention"])
@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_one_step_raises_a_sample_above_the_baseline_and_lowers_one_below(kind, advantage):
    decoder, features = _decoder_and_features(kind, images=1)
    ids, log_probs, mask = decoder.sample(features, START, END, 1, torch.Generator().manual_seed(3))
    before = (log_probs * mask).sum().item()
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.01)
    policy_loss(log_probs, mask, torch.tensor([advantage])).backward()
    optimizer.step()
    after, _ = decoder.log_probs(features, START, END, ids)
    change = (after * mask).sum().item() - before
    assert change > 0 if advantage > 0 else change < 0


def test_ending_where_it_paid_off_becomes_likelier():
    """The end token is a rewarded word: a caption ending well makes ending there likelier."""
    decoder, features = _decoder_and_features("lstm", images=1)
    ids = torch.tensor([[5, 6, END, 0]])
    log_probs, mask = decoder.log_probs(features, START, END, ids)
    before = log_probs[0, 2].item()
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.05)
    policy_loss(log_probs, mask, torch.tensor([1.0])).backward()
    optimizer.step()
    assert decoder.log_probs(features, START, END, ids)[0][0, 2].item() > before


def test_identical_samples_have_no_advantage_under_the_mean_baseline():
    rewards = torch.tensor([[0.7, 0.7, 0.7, 0.7], [0.0, 1.0, 2.0, 3.0]])
    mean = advantages(rewards)
    assert torch.equal(mean[0], torch.zeros(4))
    assert torch.allclose(mean[1], torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0]))  # minus the other three's mean
    greedy = advantages(rewards, greedy=torch.tensor([0.5, 1.0]))
    assert torch.allclose(greedy, rewards - torch.tensor([[0.5], [1.0]]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        advantages(rewards[:, :1])
