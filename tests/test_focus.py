"""caption-focus on a real checkpoint: it measures an attention decoder and refuses an LSTM one
in one line."""

from __future__ import annotations

import subprocess

import pytest

from captioning.checkpoint import save_checkpoint
from captioning.layout import read_split
from captioning.model import Captioner
from captioning.params import ModelParams
from captioning.text import Vocabulary
from conftest import venv_env


def _focus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["caption-focus", *args], env=venv_env(), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


@pytest.mark.slow  # seconds of subprocesses: CI runs it, the edit-test loop does not
def test_focus_reads_an_attention_checkpoint_and_refuses_an_lstm_one(tiny_data, tmp_path):
    train = read_split(tiny_data, "train")
    vocab = Vocabulary.build([c for cs in train.captions.values() for c in cs], 1)
    for decoder in ("attention", "lstm"):
        params = ModelParams(image_size=32, embed_size=16, hidden_size=24, decoder=decoder, attention_size=8)
        save_checkpoint(tmp_path / f"{decoder}.pt", Captioner.build(params, len(vocab)), vocab, params={})

    focus = _focus("--checkpoint", str(tmp_path / "attention.pt"), "--data", str(tiny_data), "--words", "3")
    assert focus.returncode == 0, focus.stderr[-3000:]
    first, *table = focus.stdout.splitlines()
    assert first.startswith("12 test images, ") and "4 cells: mean largest weight" in first
    assert "(even share 0.250)" in first and "(even: ln 4 = 1.386)" in first
    assert table[1:3] == ["| word | count | mean largest weight |", "|---|---|---|"] and len(table) <= 3 + 3

    refused = _focus("--checkpoint", str(tmp_path / "lstm.pt"), "--data", str(tiny_data))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"caption-focus: {tmp_path / 'lstm.pt'}: model.decoder is lstm; this needs a checkpoint trained with "
        "model.decoder: attention"]
    missing = _focus("--checkpoint", str(tmp_path / "attention.pt"), "--data", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and missing.stderr.startswith("caption-focus: ") and "Traceback" not in missing.stderr
