"""Bad input gets a clear error naming the file or key; a killed stage loses nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
import torchvision
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from captioning.errors import InputError, UserError
from captioning.images import BadImageError, load_rgb, resize_all
from captioning.layout import DatasetError, read_split
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
    with pytest.raises(InputError, match=r"captions\.json: not valid JSON"):
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
                           "--out", str(out), "--summary", str(tmp_path / "source.json"),
                           "--inputs", str(tmp_path)],
                          capture_output=True, text=True, env=venv_env())
    assert done.returncode != 0
    assert "train.lr must be > 0" in done.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("train_backbone", [False, True], ids=["cached-features", "images"])
def test_kill_9_during_training_then_rerun_resumes_to_the_same_result(tiny_data, tmp_path, train_backbone):
    """`kill -9` the train stage after a resume checkpoint; the rerun resumes and ends identical."""
    work = tmp_path / "work"
    work.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(image_size=32, embed_size=16, hidden_size=24, train_backbone=train_backbone)
    params["train"].update(epochs=3, batch_size=20, log_every=1, checkpoint_every=2)
    params["compute"].update(num_workers=0)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(tiny_data, work / "raw")
    env = venv_env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    run = [sys.executable, str(REPO / "stages" / "vocab.py"), "--data", "raw", "--out", "vocab.json"]
    subprocess.run(run, cwd=work, env=env, check=True, capture_output=True)
    torch.manual_seed(0)  # no pretrain: a random backbone (fc excluded, as pretrain writes it)
    torch.save({k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")},
               work / "backbone.pt")
    run = [sys.executable, str(REPO / "stages" / "features.py"), "--data", "raw",
           "--backbone", "backbone.pt", "--out", "features"]
    subprocess.run(run, cwd=work, env=env, check=True, capture_output=True)

    def train(tag: str) -> list[str]:
        return [sys.executable, str(REPO / "stages" / "train.py"), "--data", "raw",
                "--vocab", "vocab.json", "--backbone", "backbone.pt", "--features", "features",
                "--pretrain-curve", "none.csv", "--checkpoint", f"{tag}/checkpoint.pt",
                "--metrics", f"{tag}/train.json", "--plots", f"{tag}/plots", "--resume-dir", "resume"]

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
    # The plots hold every step and epoch, those before the kill included...
    for name in ("train_loss.csv", "val.csv"):
        assert (work / "killed" / "plots" / name).read_text() == (work / "straight" / "plots" / name).read_text()
    # ... and the resumed training continued its own MLflow run: two trainings, two runs, each
    # holding every point once.
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("captioning").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    curves = [{key: [(m.step, m.value) for m in sorted(client.get_metric_history(r.info.run_id, key),
                                                       key=lambda m: m.step)]
               for key in ("train_loss", "val_loss", "val_cider")} for r in runs]
    assert curves[0] == curves[1]
    assert [r.data.tags.get("captioning.resumed") for r in runs].count("yes") == 1


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


def _bomb_png(path, side: int = 20000) -> None:
    """A real, valid 1-bit PNG of side x side pixels (400 Mpx, far over Pillow's limit) in ~50 kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    packer, row = zlib.compressobj(9), b"\0" * (1 + side // 8)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _bad_image_folder(folder):
    """One image of every awkward kind, and the COCO captions file naming them (and a missing one)."""
    folder.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(folder / "good.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "good.jpg").read_bytes()[:100])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture")
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(folder / "alpha.png")  # fully transparent red
    Image.new("P", (40, 30), 3).save(folder / "palette.png")
    Image.new("L", (40, 30), 90).save(folder / "grey.png")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red in CMYK
    Image.fromarray(np.full((30, 40), 32896, dtype=np.uint16)).save(folder / "grey16.png")  # mid grey
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    stored = Image.new("RGB", (60, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 30, 40))  # left half red -> top half once upright
    stored.save(folder / "exif.jpg", exif=exif, quality=95)
    _bomb_png(folder / "bomb.png")
    names = ["good.jpg", "truncated.jpg", "zero.jpg", "text.jpg", "alpha.png", "palette.png", "grey.png",
             "cmyk.jpg", "grey16.png", "exif.jpg", "bomb.png", "missing.jpg"]
    images = [{"id": i, "file_name": n} for i, n in enumerate(names)]
    annotations = [{"id": i, "image_id": i, "caption": f"picture {n}"} for i, n in enumerate(names)]
    return images, annotations


def _stage(name):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _local_params(tmp_path, **data):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(source="local", images_dir=str(tmp_path / "photos"),
                       annotations=str(tmp_path / "captions.json"), **data)
    raw["resize"].update(side=32, workers=2)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_bad_images_in_a_local_source_under_both_policies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images, annotations = _bad_image_folder(tmp_path / "photos")
    # Every image in train (the split of a Karpathy-format file), one good image each in val/test.
    entries = [{"filename": r["file_name"], "imgid": r["id"], "split": "train",
                "sentences": [{"raw": a["caption"]}]} for r, a in zip(images, annotations)]
    entries += [{"filename": "good.jpg", "imgid": 100 + n, "split": s, "sentences": [{"raw": "green"}]}
                for n, s in enumerate(("val", "test"))]
    (tmp_path / "captions.json").write_text(json.dumps({"images": entries}))

    with pytest.raises(UserError, match=r"1 of 14 images are missing \(looked in .*photos\): missing.jpg"):
        _stage("download").main(_local_params(tmp_path), "raw", "downloads", "source.json", str(tmp_path))
    _stage("download").main(_local_params(tmp_path, on_bad_image="skip"), "raw", "downloads", "source.json",
                            str(tmp_path))
    with pytest.raises(UserError, match=r"(?s)photos/\w+\.(jpg|png): .*on_bad_image: skip"):
        _stage("resize").main(_local_params(tmp_path), "raw", "resized")
    assert not list((tmp_path / "resized").glob("*"))  # no split, no report: nothing half-written

    _stage("resize").main(_local_params(tmp_path, on_bad_image="skip"), "raw", "resized")
    report = json.loads((tmp_path / "resized" / "bad_images.json").read_text())
    reasons = {e["file_name"]: e["reason"] for e in report["skipped"]["train"]}
    assert reasons["missing.jpg"] == "missing file" and reasons["zero.jpg"] == "empty file"
    assert reasons["text.jpg"] == "not an image Pillow can read"
    assert reasons["truncated.jpg"].startswith("truncated or corrupt")
    assert reasons["bomb.png"].startswith("too large to decode safely")
    assert report["counts"] == {"empty file": 1, "missing file": 1, "not an image Pillow can read": 1,
                                "too large to decode safely": 1, "truncated or corrupt": 1}
    kept = read_split("resized", "train")
    assert sorted(r["file_name"] for r in kept.images) == sorted(
        ["good.jpg", "alpha.png", "palette.png", "grey.png", "cmyk.jpg", "grey16.png", "exif.jpg"])

    def pixel(name, xy=(16, 16)):
        with Image.open(tmp_path / "resized" / "train" / "images" / name) as image:
            assert image.mode == "RGB" and image.size == (32, 32)
            return np.asarray(image)[xy[1], xy[0]].astype(int)

    assert (abs(pixel("cmyk.jpg") - (255, 0, 0)) < 12).all()  # not inverted, not garbled
    assert (abs(pixel("grey16.png") - 128) < 3).all()  # scaled to 8 bits, not clipped to white
    assert (pixel("alpha.png") > 240).all()  # transparent composites on white, not red
    assert (abs(pixel("grey.png") - 90) < 3).all()
    assert (abs(pixel("exif.jpg", (16, 4)) - (255, 0, 0)) < 40).all()  # upright: red on top
    assert (abs(pixel("exif.jpg", (16, 28)) - (0, 0, 255)) < 40).all()


def test_bad_annotations_in_a_local_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    for i in range(6):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(tmp_path / "photos" / f"{i}.jpg")
    ann = tmp_path / "captions.json"
    params = _local_params(tmp_path, val_fraction=0.2, test_fraction=0.2)

    def attempt(doc):
        ann.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        _stage("download").main(params, "raw", "downloads", "source.json", str(tmp_path))

    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(6)]
    with pytest.raises(UserError, match=r"captions\.json: not valid JSON"):
        attempt('{"images": [')
    with pytest.raises(UserError, match=r"captions\.json: annotations\[0\] needs 'image_id' and 'caption'"):
        attempt({"images": images, "annotations": [{"image_id": 0}]})
    with pytest.raises(UserError, match=r"captions\.json: images\[1\] repeats image id 0"):
        attempt({"images": [images[0], {**images[1], "id": 0}], "annotations": []})
    with pytest.raises(UserError, match=r"images\[0\] file_name '../0.jpg' must be a relative path inside"):
        attempt({"images": [{"id": 0, "file_name": "../0.jpg"}], "annotations": []})
    with pytest.raises(UserError, match=r"no 'annotations' list|needs 'filename', 'split' and 'sentences'"):
        attempt({"images": [{"id": 0}]})

    long_caption = "Ein Café, très grand — " + "word " * 400
    annotations = [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(
        [(0, "  "), (0, "a red one"), (1, long_caption), (2, "two"), (3, "three"), (4, "four"), (5, "")])]
    attempt({"images": images, "annotations": annotations})
    _stage("resize").main(params, "raw", "resized")
    report = json.loads((tmp_path / "resized" / "bad_images.json").read_text())
    assert sum(report["empty_captions"].values()) == 2  # "  " and "": skipped, counted
    assert sum(report["without_caption"].values()) == 1  # image 5 had only the empty caption
    kept = {r["id"]: c for s in ("train", "val", "test") for r in read_split("resized", s).images
            for c in [read_split("resized", s).captions[r["id"]]]}
    assert 5 not in kept and kept[1] == [long_caption] and kept[0] == ["a red one"]
