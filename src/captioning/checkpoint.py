"""The self-describing checkpoint: model config, vocabulary, params and weights in one file.

Evaluate, predict and the MLflow model rebuild the captioner from it alone, and it loads with
`torch.load(weights_only=True)`: plain dicts, lists, numbers, strings and tensors, no pickled classes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from captioning.errors import UserError
from captioning.io import atomic_path
from captioning.model import Captioner
from captioning.text import Vocabulary

# 2: the config always names model.grid_layer. Format 1 predates it: its attention decoders
# attended over layer4, which loading fills in.
FORMAT = 2
# The stage that writes each of the pipeline's checkpoints (dvc.yaml), for the error that misses one.
STAGE = {"ce.pt": "train", "checkpoint.pt": "scst"}


class CheckpointError(UserError, ValueError):
    pass


def save_checkpoint(path: str | Path, model: Captioner, vocab: Vocabulary, params: dict,
                    state_dict: dict | None = None) -> None:
    """Write the checkpoint atomically; `state_dict` overrides the model's current weights."""
    payload = {
        "format": FORMAT,
        "config": model.config,
        "vocab": vocab.words,
        "params": params,
        "state_dict": state_dict if state_dict is not None else model.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, map_location="cpu", expect_vocab: Vocabulary | None = None,
                    ) -> tuple[Captioner, Vocabulary, dict]:
    """(model in eval mode, vocab, the params it was trained with).

    With `expect_vocab`, a checkpoint trained with another vocabulary is refused: its word ids
    would mean other words.
    """
    path = Path(path)
    if not path.is_file():
        made = f"; the {STAGE[path.name]} stage writes it: dvc repro {STAGE[path.name]}" if path.name in STAGE else ""
        raise CheckpointError(f"{path}: no checkpoint{made}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (1, FORMAT):
        raise CheckpointError(f"{path}: not a captioning checkpoint of format 1 or {FORMAT}")
    if ckpt["format"] == 1:
        ckpt["config"] = {"grid_layer": "layer4", **ckpt["config"]}
    vocab = Vocabulary(ckpt["vocab"])
    if len(vocab) != ckpt["config"]["vocab_size"]:
        raise CheckpointError(
            f"{path}: its vocabulary has {len(vocab)} words but its model expects "
            f"{ckpt['config']['vocab_size']}; the file is inconsistent, retrain it"
        )
    if expect_vocab is not None and vocab != expect_vocab:
        diff = next((i for i, (a, b) in enumerate(zip(vocab.words, expect_vocab.words)) if a != b),
                    min(len(vocab), len(expect_vocab)))
        raise CheckpointError(
            f"{path}: trained with a different vocabulary ({len(vocab)} words) than the current one "
            f"({len(expect_vocab)} words; first difference at index {diff}); retrain it (dvc repro train)")
    model = Captioner(ckpt["config"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit its own model config {ckpt['config']}: {err}") from None
    return model.eval(), vocab, ckpt["params"]
