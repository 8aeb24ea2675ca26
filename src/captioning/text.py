"""The one tokenizer and the Vocabulary.

`tokenize` is used everywhere captions become tokens: building the vocab, encoding training
targets, pretraining concepts, the per-epoch scores and the grounded score. It is the seed's:
nltk's Treebank word tokenizer on the lowercased caption, which is what `word_tokenize` runs
after splitting sentences with punkt. Punkt needs a download (a classic first-run failure
offline) and captions are one sentence, so the split is left out.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from captioning.errors import UserError
from captioning.io import write_text_atomic

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"


class VocabularyError(UserError, ValueError):
    """A vocabulary file that is missing or not one."""


SPECIALS = (PAD, START, END, UNK)  # PAD is index 0: padding and embeddings rely on it



@functools.cache
def _treebank():
    # Imported on first use: importing nltk takes over a second, and most stages never tokenize.
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def tokenize(caption: str) -> list[str]:
    """The caption's lowercased Treebank tokens ("a dog's t-shirt" -> a, dog, 's, t-shirt).

    As the PTB tokenizer that scores captions: punctuation tokens are dropped, hyphenated words
    stay one token ("t-shirt", "black-and-white", "2-year-old"), and "'s" and "n't" are split off.
    Words keep any Unicode letters ("café"). A period ending a word inside the caption ("a dog. a
    cat") is a sentence end, which punkt would have split off: dropped; "u.s." keeps its periods.
    """
    return list(_tokens(caption))


@functools.lru_cache(maxsize=1 << 16)  # captions recur: vocab counts then encodes, val scores every epoch
def _tokens(caption: str) -> tuple[str, ...]:
    words = []
    for token in _treebank().tokenize(caption.lower()):
        token = token.strip("-")  # a dash at a word's edge, "--" between words
        if token.endswith(".") and token.count(".") == 1:
            token = token[:-1]
        if has_words(token):
            words.append(token)
    return tuple(words)


def has_words(caption: str) -> bool:
    """Whether `tokenize(caption)` has a token, without tokenizing: it has one exactly when the
    caption holds a letter or a digit (the tokenizer keeps every such character)."""
    return any(ch.isalnum() for ch in caption)


class Vocabulary:
    """Word <-> index mapping; JSON in, JSON out (never pickled: a moved class breaks pickles)."""

    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {list(words[:4])}")
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary must not repeat a word")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, captions: Iterable[str], threshold: int) -> "Vocabulary":
        """Words seen at least `threshold` times, most frequent first (ties alphabetical)."""
        counts = Counter(tok for caption in captions for tok in tokenize(caption))
        kept = sorted((w for w, n in counts.items() if n >= threshold), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *(w for w in kept if w not in SPECIALS)])

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    @property
    def pad_id(self) -> int:
        return self.index[PAD]

    @property
    def start_id(self) -> int:
        return self.index[START]

    @property
    def end_id(self) -> int:
        return self.index[END]

    @property
    def unk_id(self) -> int:
        return self.index[UNK]

    def encode(self, caption: str) -> list[int]:
        """`<start> tokens... <end>` as ids; unknown words become `<unk>`."""
        ids = [self.index.get(tok, self.unk_id) for tok in tokenize(caption)]
        return [self.start_id, *ids, self.end_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first `<end>`, without special tokens except `<unk>`."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.words[i])
        return " ".join(words)

    def to_json(self) -> str:
        return json.dumps({"words": self.words}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        return cls(json.loads(text)["words"])

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        try:
            return cls.from_json(Path(path).read_text())
        except FileNotFoundError:
            raise VocabularyError(f"{path}: missing; run the vocab stage (dvc repro vocab)") from None
        except (ValueError, KeyError) as err:
            raise VocabularyError(f"{path}: not a vocabulary file ({err}); run the vocab stage again") from None
