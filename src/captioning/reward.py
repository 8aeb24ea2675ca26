"""CIDEr-D as a reward for self-critical training: pycocoevalcap's CIDEr-D (Vedantam et al. 2015;
n-grams 1-4, clipped term frequencies, a Gaussian penalty on the length difference, sigma 6, x10),
with the document frequencies of a fixed reference corpus, counted once.

pycocoevalcap counts document frequencies over the captions it is scoring: over one image's
references every n-gram has the highest frequency, and the score of anything is 0. A reward
therefore takes its frequencies from the train references (`CiderD(train.captions)`), once, and
scores any caption of any image against that image's own references.

Captions are strings of space-separated tokens, as pycocoevalcap takes them: tokenize them first
(`text.tokenize`), and append the end token to samples and references alike where it is to be
rewarded (a caption that stops mid-phrase then lacks the n-grams that end one).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import numpy as np

# (tf-idf weight per n-gram, one dict per n), the norms of those vectors, and the length the
# Gaussian penalty compares: pycocoevalcap counts a caption's bigrams there, and so does this.
Vector = tuple[list[dict[tuple[str, ...], float]], list[float], int]


def ngram_counts(caption: str, n: int = 4) -> Counter:
    words = caption.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D of captions against their image's references, with the document frequencies of
    `corpus` (image id -> reference captions), counted once here."""

    def __init__(self, corpus: dict[int, list[str]], n: int = 4, sigma: float = 6.0):
        if not corpus:
            raise ValueError("CIDEr-D needs a reference corpus with at least one image")
        self.n, self.sigma = n, sigma
        self.references = corpus
        self.frequency = Counter()
        for captions in corpus.values():
            self.frequency.update({gram for caption in captions for gram in ngram_counts(caption, n)})
        self.log_images = math.log(float(len(corpus)))
        self._cooked: dict[int, list[Vector]] = {}

    def score(self, image_id: int, caption: str) -> float:
        """One caption of image `image_id`."""
        return self._score(self.vector(ngram_counts(caption, self.n)), self._references(image_id))

    def scores(self, image_ids: Iterable[int], captions: Iterable[str]) -> np.ndarray:
        """A batch: caption i of image `image_ids[i]`. Each image's references are weighed once
        (and kept), and a caption sampled more than once for an image is scored once."""
        done: dict[tuple[int, str], float] = {}
        out = []
        for image_id, caption in zip(image_ids, captions):
            key = (image_id, caption)
            if key not in done:
                done[key] = self.score(image_id, caption)
            out.append(done[key])
        return np.array(out, dtype=np.float64)

    def vector(self, counts: Counter) -> Vector:
        weights: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norms, length = [0.0] * self.n, 0
        for gram, term_frequency in counts.items():
            k = len(gram) - 1
            weight = float(term_frequency) * (self.log_images - math.log(max(1.0, self.frequency[gram])))
            weights[k][gram] = weight
            norms[k] += weight ** 2
            if k == 1:
                length += term_frequency
        return weights, [math.sqrt(v) for v in norms], length

    def _references(self, image_id: int) -> list[Vector]:
        if image_id not in self._cooked:
            captions = self.references.get(image_id)
            if not captions:
                raise KeyError(f"image {image_id}: no reference captions in the corpus")
            self._cooked[image_id] = [self.vector(ngram_counts(c, self.n)) for c in captions]
        return self._cooked[image_id]

    def _score(self, hypothesis: Vector, references: list[Vector]) -> float:
        weights, norms, length = hypothesis
        total = np.zeros(self.n)
        for ref_weights, ref_norms, ref_length in references:
            penalty = math.e ** (-(float(length - ref_length) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                value = sum(min(w, ref_weights[k].get(gram, 0.0)) * ref_weights[k].get(gram, 0.0)
                            for gram, w in weights[k].items())
                if norms[k] != 0 and ref_norms[k] != 0:
                    value /= norms[k] * ref_norms[k]
                total[k] += value * penalty
        return float(np.mean(total) / len(references) * 10.0)
