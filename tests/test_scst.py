"""The self-critical mechanism: sampling with log-probabilities, the baselines, the policy step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from captioning.accel import Runtime
from captioning.layout import read_split
from captioning.model import AttentionDecoder, Captioner, Decoder
from captioning.params import ComputeParams, ModelParams, ScstParams, TrainParams
from captioning.scst import SelfCritical, advantages, policy_loss, reward_for, scst_data
from captioning.synthetic import scene_scores
from captioning.text import Vocabulary
from captioning.training import fit, training_data
from conftest import Recorder

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


# ---- the scst objective under training.fit ------------------------------------------------------

TRAIN = TrainParams(batch_size=40, captions_per_image=0)
INLINE = Runtime(compute=ComputeParams(num_workers=0))


def _fine_tune(tiny_data, decoder: str, cached: bool, settings: ScstParams, callbacks=None, resume=None):
    """A cross-entropy-initialised-alike captioner (seeded) fine-tuned by `settings` on tiny_data:
    from random cached features of the right shape, or from the images (backbone trained)."""
    train, val = read_split(tiny_data, "train"), read_split(tiny_data, "val")
    vocab = Vocabulary.build([c for cs in train.captions.values() for c in cs], 1)
    params = ModelParams(image_size=32, embed_size=16, hidden_size=24, attention_size=8, decoder=decoder,
                         train_backbone=not cached)
    torch.manual_seed(0)
    model = Captioner.build(params, len(vocab))
    arrays = None
    if cached:
        rng = np.random.default_rng(0)
        cell = (4,) if decoder == "attention" else ()  # layer3's 2 x 2 grid at 32 px
        arrays = tuple(rng.standard_normal((len(s.images), 1, *cell, model.encoder.feature_size)).astype(np.float16)
                       for s in (train, val))
    data = scst_data(training_data(vocab, train, val, 32, TRAIN, arrays, scene_scores), settings)
    objective = SelfCritical(model, vocab, reward_for(data.train.dataset, vocab), settings, INLINE, cached)
    result = fit(model, data, settings, seed=3, runtime=INLINE, callbacks=callbacks or Recorder(),
                 resume_path=resume, objective=objective)
    return model, result


SETTINGS = ScstParams(epochs=2, batch_size=8, samples=3, lr=0.01, log_every=1, checkpoint_every=3,
                      select_metric="last")


@pytest.mark.parametrize("decoder, cached, baseline", [("lstm", True, "mean"), ("attention", True, "greedy"),
                                                       ("lstm", False, "greedy")],
                         ids=["lstm-features-mean", "attention-features-greedy", "lstm-images-greedy"])
def test_fine_tuning_moves_the_weights_logs_its_reward_and_repeats(tiny_data, decoder, cached, baseline):
    settings = dataclasses.replace(SETTINGS, baseline=baseline)
    logs = Recorder()
    model, result = _fine_tune(tiny_data, decoder, cached, settings, logs)
    again, _ = _fine_tune(tiny_data, decoder, cached, settings)
    torch.manual_seed(0)
    start = _fine_tune(tiny_data, decoder, cached, dataclasses.replace(settings, epochs=0))[0]
    state, repeat, before = model.state_dict(), again.state_dict(), start.state_dict()
    assert all(torch.equal(state[k], repeat[k]) for k in state)  # same seed, same weights
    assert any(not torch.equal(state[k], before[k]) for k in state)
    assert [r["epoch"] for r in logs.epochs] == [0, 1, 2] and result.best_epoch == 2
    assert {"reward", "baseline", "advantage", "advantage_sd", "loss"} <= set(logs.steps[0])
    assert all(0 <= r["reward"] and r["advantage_sd"] >= 0 for r in logs.steps)
    if baseline == "mean":  # each sample against its image's other samples: zero on average
        assert all(abs(r["advantage"]) < 1e-5 for r in logs.steps)


def test_an_interrupted_fine_tuning_resumes_to_identical_weights(tiny_data, tmp_path):
    resume = tmp_path / "scst.pt"
    straight, result = _fine_tune(tiny_data, "lstm", True, SETTINGS)
    with pytest.raises(KeyboardInterrupt):  # killed in epoch 2, after the step-6 checkpoint
        _fine_tune(tiny_data, "lstm", True, SETTINGS, Recorder(stop_at=8), resume)
    resumed, again = _fine_tune(tiny_data, "lstm", True, SETTINGS, Recorder(), resume)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.steps == result.steps and [r["epoch"] for r in again.history] == [0, 1, 2]


def test_epoch_0_the_starting_model_is_kept_when_no_epoch_beats_it(tiny_data):
    settings = dataclasses.replace(SETTINGS, epochs=1, lr=1.0, select_metric="val_loss")  # a rate that ruins it
    model, result = _fine_tune(tiny_data, "lstm", True, settings)
    assert result.best_epoch == 0 and result.history[1]["val_loss"] > result.history[0]["val_loss"]
    torch.manual_seed(0)
    start = _fine_tune(tiny_data, "lstm", True, dataclasses.replace(settings, epochs=0))[0].state_dict()
    assert all(torch.equal(result.best_state[k], start[k]) for k in start)
