"""The one tokenizer and the Vocabulary.

`tokenize` is used everywhere captions become tokens: building the vocab, encoding training
targets, and the grounded score. It needs no downloaded data (nltk's punkt cannot be fetched
offline and is a classic first-run failure). Punctuation is dropped, as the PTB tokenizer that
scores captions drops it too.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from captioning.io import write_text_atomic

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # PAD is index 0: padding and embeddings rely on it

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(caption: str) -> list[str]:
    """Lowercase words and numbers of `caption`; punctuation is dropped."""
    return _WORD.findall(caption.lower())


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
        return cls.from_json(Path(path).read_text())
