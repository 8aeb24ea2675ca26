"""The CIDEr-D reward: pycocoevalcap's CIDEr-D, with document frequencies from a fixed corpus."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from captioning.layout import read_split
from captioning.reward import CiderD
from captioning.text import tokenize


def _tokenized(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    return {i: [" ".join(tokenize(c)) for c in cs] for i, cs in captions.items()}


def _word_salad(rng: random.Random, images: int) -> tuple[dict[int, list[str]], dict[int, str]]:
    """Short captions over a small vocabulary, so that n-grams repeat within and across images."""
    words = "a an the red blue green circle square triangle left right of above below <end>".split()
    caption = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))  # noqa: E731
    return ({i: [caption() for _ in range(rng.randint(1, 5))] for i in range(images)},
            {i: caption() for i in range(images)})


@pytest.mark.parametrize("images", [1, 2, 7, 40])
def test_cider_d_equals_pycocoevalcap_with_the_same_frequencies(images):
    references, hypotheses = _word_salad(random.Random(images), images)
    ids = sorted(references)
    _, expected = Cider().compute_score(references, {i: [hypotheses[i]] for i in ids})
    got = CiderD(references).scores(ids, [hypotheses[i] for i in ids])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_cider_d_equals_pycocoevalcap_on_the_synthetic_captions(tiny_data):
    """Val captions of one image scored against the others' references, tokenized as training does."""
    val = read_split(tiny_data, "val")
    references = _tokenized({i: cs[1:] for i, cs in val.captions.items()})
    hypotheses = {i: " ".join(tokenize(cs[0])) for i, cs in val.captions.items()}
    ids = sorted(references)
    _, expected = Cider().compute_score(references, {i: [hypotheses[i]] for i in ids})
    np.testing.assert_allclose(CiderD(references).scores(ids, [hypotheses[i] for i in ids]), expected, atol=1e-6)
    assert expected.mean() > 1.0  # the captions share their grammar: far from a trivial 0


def test_frequencies_come_from_the_corpus_not_from_the_image_scored(tiny_data):
    train = _tokenized(read_split(tiny_data, "train").captions)
    image, (first, *others) = next(iter(train.items()))
    assert CiderD(train).score(image, first) > 1.0
    # Frequencies from this image's references alone: every n-gram is in every "document", so
    # every weight is 0, the reason a reward cannot count them over what it scores.
    assert CiderD({image: others}).score(image, first) == 0.0


def test_a_batch_scores_as_one_caption_at_a_time():
    """A mixed batch: images sampled several times, with 1-5 references each, captions repeated,
    empty, or holding words the corpus lacks."""
    references, hypotheses = _word_salad(random.Random(5), 20)
    reward = CiderD(references)
    rng = random.Random(0)
    ids = [rng.randrange(20) for _ in range(200)]
    captions = [rng.choice([hypotheses[i], rng.choice(references[i]), "", "zebra zebra red zebra <end>",
                            f"{hypotheses[i]} okapi"]) for i in ids]
    batch = reward.scores(ids, captions)
    assert batch.dtype == np.float64 and batch.shape == (200,)
    alone = [CiderD(references).score(i, c) for i, c in zip(ids, captions)]  # each image's references fresh
    np.testing.assert_allclose(batch, alone, rtol=0, atol=1e-12)
    np.testing.assert_allclose(reward.scores(ids[::-1], captions[::-1]), batch[::-1], rtol=0, atol=1e-12)
    assert reward.scores([], []).shape == (0,)


def test_n_grams_outside_the_corpus_weigh_as_in_pycocoevalcap():
    """Words no reference holds have document frequency 0; repeated, they still count as terms."""
    references, hypotheses = _word_salad(random.Random(3), 12)
    ids = sorted(references)
    hypotheses = {i: f"{hypotheses[i]} zebra okapi zebra okapi" if i % 2 else f"zebra {hypotheses[i]}" for i in ids}
    _, expected = Cider().compute_score(references, {i: [hypotheses[i]] for i in ids})
    got = CiderD(references).scores(ids, [hypotheses[i] for i in ids])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert (got > 0).any()


def test_the_end_token_is_rewarded_where_it_is_part_of_the_captions():
    """A caption that stops mid-phrase lacks the n-grams that end the references' phrases."""
    references = {1: ["a man riding a horse <end>", "a man rides a horse <end>"],
                  2: ["two dogs on the grass <end>", "dogs playing <end>"],
                  3: ["a red circle <end>"]}
    reward = CiderD(references)
    assert reward.score(1, "a man riding a horse <end>") > reward.score(1, "a man riding a horse")
    assert reward.score(1, "a man riding a <end>") < reward.score(1, "a man riding a horse <end>")


def test_an_image_without_references_and_an_empty_corpus_are_refused():
    with pytest.raises(ValueError, match="at least one image"):
        CiderD({})
    with pytest.raises(KeyError, match="image 9: no reference captions"):
        CiderD({1: ["a red circle"]}).score(9, "a red circle")
