"""Bad input gets a clear error naming the file or key; a killed stage loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision
import yaml
from PIL import Image

from captioning.datasets import DatasetError, read_split
from captioning.images import BadImageError, load_rgb, resize_all
from conftest import REPO, venv_env


def test_corrupt_image_error_names_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:60])  # truncated JPEG
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    for broken in (bad, text):
        with pytest.raises(BadImageError, match=str(broken)):
            resize_all([(good, tmp_path / "out" / "a.jpg"), (broken, tmp_path / "out" / "b.jpg")], 16, 90, workers=2)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (20, 10)).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (20, 10)


def test_exif_rotated_photo_is_upright(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    assert load_rgb(path).size == (20, 40)


def test_malformed_captions_name_the_file_and_record(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    path = folder / "captions.json"
    path.write_text("{not json")
    with pytest.raises(DatasetError, match=r"captions\.json: not valid JSON"):
        read_split(tmp_path, "train")
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 9, "caption": "y"}]}))
    with pytest.raises(DatasetError, match=r"annotations\[1\] refers to image_id 9"):
        read_split(tmp_path, "train")
    path.write_text(json.dumps({"images": [{"file_name": "a.jpg"}], "annotations": []}))
    with pytest.raises(DatasetError, match=r"images\[0\] needs 'id'"):
        read_split(tmp_path, "train")


def test_bad_params_stop_a_stage_before_any_work(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"lr": -0.1}}))
    out = tmp_path / "raw"
    done = subprocess.run([sys.executable, str(REPO / "stages" / "download.py"), "--params", str(params),
                           "--out", str(out)], capture_output=True, text=True, env=venv_env())
    assert done.returncode != 0
    assert "train.lr must be > 0" in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_kill_9_during_training_then_rerun_resumes_to_the_same_result(tiny_data, tmp_path):
    """`kill -9` the train stage after a resume checkpoint; the rerun resumes and ends identical."""
    work = tmp_path / "work"
    work.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(image_size=32, embed_size=16, hidden_size=24)
    params["train"].update(epochs=3, batch_size=20, num_workers=0, log_every=1, checkpoint_every=2)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(tiny_data, work / "raw")
    env = venv_env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    run = [sys.executable, str(REPO / "stages" / "vocab.py"), "--data", "raw", "--out", "vocab.json"]
    subprocess.run(run, cwd=work, env=env, check=True, capture_output=True)
    torch.manual_seed(0)  # no pretrain: a random backbone (fc excluded, as pretrain writes it)
    torch.save({k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")},
               work / "backbone.pt")

    def train(tag: str) -> list[str]:
        return [sys.executable, str(REPO / "stages" / "train.py"), "--data", "raw", "--images", "raw",
                "--vocab", "vocab.json", "--backbone", "backbone.pt", "--checkpoint", f"{tag}/checkpoint.pt",
                "--metrics", f"{tag}/train.json", "--plots", f"{tag}/plots", "--run-info", f"{tag}/run.json",
                "--resume-dir", "resume"]

    subprocess.run(train("straight"), cwd=work, env=env, check=True, capture_output=True)
    assert not list((work / "resume").glob("*.pt"))  # a finished run leaves no resume state

    proc = subprocess.Popen(train("killed"), cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # kill once a checkpoint exists and training has moved past it
        if "Step [" in line and list((work / "resume").glob("*.pt")) and "Epoch [2/3]" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
        assert time.monotonic() < deadline
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (work / "killed" / "checkpoint.pt").exists()  # nothing that looks complete

    rerun = subprocess.run(train("killed"), cwd=work, env=env, check=True, capture_output=True, text=True)
    assert "resumed from" in rerun.stdout
    straight = json.loads((work / "straight" / "train.json").read_text())
    resumed = json.loads((work / "killed" / "train.json").read_text())
    for key in ("final_train_loss", "val_cider", "val_loss", "val_grounded", "steps", "best_epoch"):
        assert resumed[key] == straight[key], key
    a = torch.load(work / "straight" / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(work / "killed" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_empty_captions_are_skipped_and_counted_duplicates_refused(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    path = folder / "captions.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                                "annotations": [{"image_id": 1, "caption": "  "}, {"image_id": 1, "caption": "..."},
                                                {"image_id": 1, "caption": "Ein Café, très grand" + " word" * 300}]}))
    split = read_split(tmp_path, "train")
    assert split.empty_captions == 2 and len(split.captions[1]) == 1 and split.captions[2] == []
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
                                "annotations": []}))
    with pytest.raises(DatasetError, match=r"images\[1\] repeats image id 1"):
        read_split(tmp_path, "train")


def test_checkpoint_from_another_vocabulary_is_refused(tmp_path):
    from captioning.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from captioning.model import Captioner
    from captioning.params import ModelParams
    from captioning.text import Vocabulary

    vocab = Vocabulary.build(["a red circle"], 1)
    model = Captioner.build(ModelParams(image_size=32, embed_size=8, hidden_size=8), len(vocab))
    save_checkpoint(tmp_path / "c.pt", model, vocab, {})
    other = Vocabulary.build(["a blue square"], 1)
    with pytest.raises(CheckpointError, match="different vocabulary.*first difference at index"):
        load_checkpoint(tmp_path / "c.pt", expect_vocab=other)
    load_checkpoint(tmp_path / "c.pt", expect_vocab=vocab)
