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

A batch is scored with numpy, not caption by caption: words and n-grams are numbered once, from
the corpus (an n-gram of order k is the pair (its first k - 1 words' id, its last word), looked
up in that order's sorted keys), and a caption becomes rows of (caption, n-gram id, tf-idf
weight). Each image's references are weighed once and kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import NamedTuple

import numpy as np

WORD_BITS = 24  # an n-gram's key: (id of its first k - 1 words) << WORD_BITS | its last word's id
ROW_BITS = 40  # a table key: (caption or image) << ROW_BITS | n-gram id
ROW_MASK = (1 << ROW_BITS) - 1
NO_KEY = np.iinfo(np.int64).max  # ends each sorted key array, so that a search always lands on a key


class Vectors(NamedTuple):
    """The tf-idf vectors of C captions, as rows sorted by caption, then n-gram."""

    caption: np.ndarray  # (E,) the caption of each row
    gram: np.ndarray  # (E,) n-gram id
    order: np.ndarray  # (E,) its length - 1
    weight: np.ndarray  # (E,) term frequency x idf
    norms: np.ndarray  # (C, n) norm of each order's vector
    lengths: np.ndarray  # (C,) the length the penalty compares: pycocoevalcap counts bigrams


class References(NamedTuple):
    """One image's references: a row per n-gram any of them holds, a column per reference."""

    gram: np.ndarray  # (G,) sorted n-gram ids
    weight: np.ndarray  # (G, R) each reference's weight of that n-gram (0: it lacks it)
    norms: np.ndarray  # (R, n)
    lengths: np.ndarray  # (R,)


class CiderD:
    """CIDEr-D of captions against their image's references, with the document frequencies of
    `corpus` (image id -> reference captions), counted once here."""

    def __init__(self, corpus: dict[int, list[str]], n: int = 4, sigma: float = 6.0):
        if not corpus:
            raise ValueError("CIDEr-D needs a reference corpus with at least one image")
        self.n, self.sigma = n, sigma
        self.references = corpus
        self.words: dict[str, int] = {}
        self.keys: list[np.ndarray] = []  # per order: the corpus's n-gram keys, sorted, then NO_KEY
        self.offsets = [0]  # ids of order k: offsets[k] + the key's place in keys[k]
        caption, gram, _ = self._grams([c for cs in corpus.values() for c in cs], learn=True)
        self.size = self.offsets[-1]  # n-grams in the corpus; any other gets an id >= size
        image = np.repeat(np.arange(len(corpus)), [len(cs) for cs in corpus.values()])[caption]
        in_images = unique((image << ROW_BITS) | gram)[0] & ROW_MASK  # each (image, n-gram) once
        frequency = np.bincount(in_images, minlength=self.size + 1)  # the last: n-grams outside the corpus
        self.log_images = np.log(float(len(corpus)))
        self.idf = self.log_images - np.log(np.maximum(1.0, frequency))
        self._cooked: dict[int, References] = {}

    def score(self, image_id: int, caption: str) -> float:
        """One caption of image `image_id`."""
        return float(self.scores([image_id], [caption])[0])

    def scores(self, image_ids: Iterable[int], captions: Iterable[str]) -> np.ndarray:
        """A batch: caption i of image `image_ids[i]`, each score as `score` gives it alone."""
        image_ids, captions = list(image_ids), list(captions)
        if not captions:
            return np.zeros(0)
        images = list(dict.fromkeys(image_ids))
        slots = {image_id: slot for slot, image_id in enumerate(images)}
        slot = np.fromiter(map(slots.__getitem__, image_ids), np.int64, len(image_ids))  # (C,)
        keys, ref_weight, ref_norms, ref_lengths, count = self._table(images)
        hyp = self._vectors(captions)
        # Each row of a caption against every reference of its image: (E, R), 0 where one lacks it.
        query = (slot[hyp.caption] << ROW_BITS) | hyp.gram
        place = np.searchsorted(keys, query)
        theirs = np.where((keys[place] == query)[:, None], ref_weight[place], 0.0)
        clipped = np.minimum(hyp.weight[:, None], theirs) * theirs
        refs = theirs.shape[1]
        bins = ((hyp.caption * refs)[:, None] + np.arange(refs)) * self.n + hyp.order[:, None]
        value = np.bincount(bins.ravel(), clipped.ravel(), minlength=len(captions) * refs * self.n)
        value = value.reshape(len(captions), refs, self.n).astype(np.float64, copy=False)  # (C, R, n); int if no rows
        norm, ref_norm = hyp.norms[:, None, :], ref_norms[slot]  # (C, 1, n), (C, R, n)
        np.divide(value, norm * ref_norm, out=value, where=(norm != 0) & (ref_norm != 0))
        delta = (hyp.lengths[:, None] - ref_lengths[slot]).astype(np.float64)  # (C, R)
        value *= np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[:, :, None]
        # An image with fewer than R references has zeros in the rest, which add nothing.
        return value.sum(1).mean(1) / count[slot] * 10.0

    def _grams(self, captions: list[str], learn: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every n-gram occurrence in `captions`: (caption index, n-gram id, order - 1), each (E,).
        `learn`: `captions` are the corpus, whose words and n-grams get their ids here. Otherwise an
        n-gram outside the corpus gets an id from `size` on, the same for the same n-gram."""
        tokens = [caption.split() for caption in captions]
        lengths = np.fromiter(map(len, tokens), np.int64, len(tokens))
        tokens = list(chain.from_iterable(tokens))
        if learn:
            self.words = {w: i for i, w in enumerate(dict.fromkeys(tokens))}
            if len(self.words) >= 1 << WORD_BITS:
                raise ValueError(f"CIDEr-D takes up to {1 << WORD_BITS} distinct words, not {len(self.words)}")
        outside = [] if learn else list(dict.fromkeys(w for w in tokens if w not in self.words))
        index = self.words | {w: len(self.words) + i for i, w in enumerate(outside)} if outside else self.words
        words = np.fromiter(map(index.__getitem__, tokens), np.int64, len(tokens))  # (T,)
        caption = np.repeat(np.arange(len(captions)), lengths)  # (T,) the caption of each token
        left = np.repeat(np.cumsum(lengths), lengths) - np.arange(len(words))  # (T,) tokens from it to the end
        prefix = np.zeros(len(words), dtype=np.int64)  # id of the n-gram so far starting at each token
        fresh = self.offsets[-1]
        found = []
        for k in range(self.n):
            at = np.flatnonzero(left > k)  # the tokens that start an n-gram of order k + 1
            key = (prefix[at] << WORD_BITS) | words[at + k]
            if learn:
                known, ids = unique(key)
                self.keys.append(np.append(known, NO_KEY))
                ids += self.offsets[-1]
                self.offsets.append(self.offsets[-1] + len(known))
            else:
                place = np.searchsorted(self.keys[k], key)
                known = self.keys[k][place] == key
                ids = self.offsets[k] + place
                new, new_ids = unique(key[~known])
                ids[~known] = fresh + new_ids
                fresh += len(new)
            prefix[at] = ids
            found.append((caption[at], ids, np.full(len(at), k)))
        return tuple(np.concatenate(column) for column in zip(*found))

    def _vectors(self, captions: list[str]) -> Vectors:
        caption, gram, order = self._grams(captions)
        rows, row = unique((caption << ROW_BITS) | gram)  # each (caption, n-gram) once
        lengths = np.bincount(caption[order == 1], minlength=len(captions))
        tf = np.bincount(row, minlength=len(rows))
        caption, gram, order = rows >> ROW_BITS, rows & ROW_MASK, scatter(order, row, len(rows))
        weight = tf * self.idf[np.minimum(gram, self.size)]
        norms = np.bincount(caption * self.n + order, weight ** 2, minlength=len(captions) * self.n)
        return Vectors(caption, gram, order, weight, np.sqrt(norms).reshape(-1, self.n), lengths)

    def _table(self, images: list[int]):
        """The references of a batch's `images` in one table: sorted keys (image slot, n-gram) then
        NO_KEY, their (rows + 1, R) weights, (U, R, n) norms, (U, R) lengths, (U,) references each."""
        self._cook([i for i in images if i not in self._cooked])
        cooked = [self._cooked[i] for i in images]
        count = np.array([len(r.lengths) for r in cooked])
        keys = np.concatenate([(slot << ROW_BITS) | r.gram for slot, r in enumerate(cooked)] + [[NO_KEY]])
        weight = np.zeros((len(keys), count.max()))
        norms, lengths = np.zeros((len(images), count.max(), self.n)), np.zeros((len(images), count.max()), np.int64)
        start = 0
        for slot, r in enumerate(cooked):
            weight[start:start + len(r.gram), :count[slot]] = r.weight
            norms[slot, :count[slot]], lengths[slot, :count[slot]] = r.norms, r.lengths
            start += len(r.gram)
        return keys, weight, norms, lengths, count

    def _cook(self, images: list[int]) -> None:
        """Weigh the references of `images`, all at once, and keep them."""
        if not images:
            return
        for image_id in images:
            if not self.references.get(image_id):
                raise KeyError(f"image {image_id}: no reference captions in the corpus")
        count = np.array([len(self.references[i]) for i in images])
        v = self._vectors([c for i in images for c in self.references[i]])
        image = np.repeat(np.arange(len(images)), count)[v.caption]  # (E,) slot of each row's image
        first = np.cumsum(count) - count  # each image's first reference
        rows, row = unique((image << ROW_BITS) | v.gram)  # each (image, n-gram) once
        weight = np.zeros((len(rows), count.max()))
        weight[row, v.caption - first[image]] = v.weight
        ends = np.searchsorted(rows >> ROW_BITS, np.arange(1, len(images)))  # where each image's rows end
        grams, weights = np.split(rows & ROW_MASK, ends), np.split(weight, ends)
        for slot, image_id in enumerate(images):
            refs = slice(first[slot], first[slot] + count[slot])
            self._cooked[image_id] = References(grams[slot], weights[slot][:, :count[slot]], v.norms[refs],
                                                v.lengths[refs])


def scatter(values: np.ndarray, place: np.ndarray, size: int) -> np.ndarray:
    """out[place[i]] = values[i]: for values equal wherever their places are."""
    out = np.empty(size, dtype=values.dtype)
    out[place] = values
    return out


def unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct values, sorted; each value's place among them). Not np.unique: on int64
    it hashes, 40x slower than this sort here."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new = np.empty(len(values), dtype=bool)
    new[:1], new[1:] = True, ordered[1:] != ordered[:-1]
    place = np.empty(len(values), dtype=np.int64)
    place[order] = np.cumsum(new) - 1
    return ordered[new], place
