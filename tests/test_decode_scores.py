"""bench/decode_scores.py on a real checkpoint and synthetic split: a row per beam size, one line
for a missing checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest

from captioning.checkpoint import save_checkpoint
from captioning.layout import read_split
from captioning.model import Captioner
from captioning.params import ModelParams
from captioning.text import Vocabulary
from conftest import REPO, venv_env


def _scores(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "decode_scores.py"), *args], env=venv_env(),
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.slow  # the Java scorers in a subprocess: CI runs it, the edit-test loop does not
def test_each_checkpoint_and_beam_gets_a_row_of_val_scores(tiny_data, tmp_path):
    train = read_split(tiny_data, "train")
    vocab = Vocabulary.build([c for cs in train.captions.values() for c in cs], 1)
    params = ModelParams(image_size=32, embed_size=16, hidden_size=24)
    save_checkpoint(tmp_path / "c.pt", Captioner.build(params, len(vocab)), vocab, params={})

    done = _scores("--checkpoint", str(tmp_path / "c.pt"), "--data", str(tiny_data), "--beam", "1", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    first, header, rule, *rows = done.stdout.splitlines()
    assert first == "val split, 12 images"
    assert header == "| checkpoint | decoding | bleu_4 | cider | grounded | strict |" and rule == "|---|---|---|---|---|---|"
    assert [row.split(" | ")[1] for row in rows] == ["greedy", "beam 2, length penalty 0.5"]
    for row in rows:
        grounded, strict = (float(cell) for cell in row.strip(" |").split(" | ")[-2:])
        assert 0 <= strict <= grounded <= 1

    missing = _scores("--checkpoint", str(tmp_path / "none.pt"), "--data", str(tiny_data))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    [line] = missing.stderr.strip().splitlines()
    assert line.startswith(f"decode_scores: {tmp_path / 'none.pt'}: no checkpoint")
