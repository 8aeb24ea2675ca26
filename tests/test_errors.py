"""Every error a user can cause stops the stage with one line on stderr that names the file or
key and the fix, a non-zero exit status and no traceback. Each stage script runs as DVC runs it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from captioning.backbone import resnet
from captioning.stage import run_stage
from captioning.text import Vocabulary
from conftest import REPO, venv_env
from test_sources import Loopback, coco_archives

STAGES = {  # each stage's command line, as in dvc.yaml, over a work folder
    "download": ["--out", "data/raw", "--downloads", "data/downloads", "--summary", "data/source.json",
                 "--inputs", "inputs/data"],
    "resize": ["--data", "data/raw", "--out", "data/resized"],
    "vocab": ["--data", "data/resized", "--out", "data/vocab.json"],
    "weights": ["--out", "models/imagenet.json", "--inputs", "inputs/model", "--data-inputs", "inputs/data"],
    "pretrain": ["--data", "data/resized", "--weights", "models/imagenet.json", "--out", "models/backbone.pt",
                 "--metrics", "metrics/pretrain.json", "--plots", "plots/pretrain/loss.csv"],
    "features": ["--data", "data/resized", "--backbone", "models/backbone.pt", "--out", "data/features"],
    "train": ["--data", "data/resized", "--vocab", "data/vocab.json", "--backbone", "models/backbone.pt",
              "--features", "data/features", "--pretrain-curve", "plots/pretrain/loss.csv", "--checkpoint",
              "models/ce.pt", "--metrics", "metrics/train.json", "--plots", "plots/train",
              "--resume-dir", "tmp/resume"],
    "scst": ["--data", "data/resized", "--features", "data/features", "--ce-checkpoint", "models/ce.pt",
             "--train-metrics", "metrics/train.json", "--checkpoint", "models/checkpoint.pt", "--metrics",
             "metrics/scst.json", "--plots", "plots/scst", "--resume-dir", "tmp/resume"],
    "evaluate": ["--checkpoint", "models/checkpoint.pt", "--vocab", "data/vocab.json", "--data", "data/resized",
                 "--val-metrics", "metrics/scst.json", "--metrics", "metrics/evaluate.json", "--decoding",
                 "models/decoding.json", "--captions", "reports/test_captions.json", "--gallery",
                 "reports/gallery.html", "--run-info", "reports/mlflow_run.json"],
}


def test_the_command_lines_here_are_dvc_yamls():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(spec) == set(STAGES)
    for stage, args in STAGES.items():
        assert spec[stage]["cmd"].split()[2:] == args, stage


def _work(tmp_path: Path, **overrides) -> Path:
    """A work folder with params.yaml (the repo's, with `overrides` as {"section.key": value})."""
    work = tmp_path / "work"
    (work / "inputs" / "data").mkdir(parents=True, exist_ok=True)
    (work / "inputs" / "model").mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in overrides.items():
        section, name = key.split(".")
        params.setdefault(section, {})[name] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work


def _fails(work: Path, stage: str, *culprits: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py"), *STAGES[stage]], cwd=work,
                          env=env or venv_env(), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 1, (stage, done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]  # progress bars may come before it
    assert line.startswith(f"{stage}: "), line
    for culprit in culprits:
        assert culprit in line, (culprit, line)
    return line


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_misspelt_param_stops_every_stage_naming_it(tmp_path, stage):
    work = _work(tmp_path, **{"train.lrr": 0.1})
    _fails(work, stage, "params.yaml: unknown key 'train.lrr'; did you mean 'train.lr'?")


@pytest.mark.parametrize("stage, key, value, says", [
    ("download", "data.captions_per_image", "five", "data.captions_per_image must be an integer, got 'five'"),
    ("evaluate", "evaluate.beam_size", 0, "evaluate.beam_size must be >= 1, got 0"),
    ("weights", "model.weights_version", "V3", "model.weights_version must be one of DEFAULT"),
    ("pretrain", "pretrain.batch_size", 1, "pretrain.batch_size must be >= 2"),
])
def test_a_bad_value_names_the_key_and_what_is_allowed(tmp_path, stage, key, value, says):
    _fails(_work(tmp_path, **{key: value}), stage, says)


@pytest.mark.slow  # seconds of subprocesses: CI runs it, the edit-test loop does not
def test_missing_wrong_or_misplaced_weights_name_the_file(tmp_path):
    work = _work(tmp_path, **{"model.pretrained": True, "model.weights_path": "inputs/model/resnet18.pth"})
    _fails(work, "weights", "model.weights_path: no file at inputs/model/resnet18.pth")
    torch.save(resnet("resnet34").state_dict(), work / "inputs" / "model" / "resnet18.pth")
    _fails(work, "weights", "inputs/model/resnet18.pth holds resnet34 weights, but model.backbone is resnet18")
    work = _work(tmp_path, **{"model.pretrained": True, "model.weights_path": str(tmp_path / "elsewhere.pth")})
    _fails(work, "weights", "model.weights_path:", "is outside inputs/model/")


@pytest.mark.slow  # seconds of subprocesses: CI runs it, the edit-test loop does not
def test_missing_inputs_of_a_stage_say_which_stage_makes_them(tmp_path):
    work = _work(tmp_path)
    _fails(work, "resize", "data/raw/train/captions.json: missing", "dvc repro download")
    _fails(work, "vocab", "data/resized/train/captions.json: missing", "dvc repro download")
    _fails(work, "pretrain", "models/imagenet.json: missing", "dvc repro weights")
    _fails(work, "evaluate", "data/vocab.json: missing", "dvc repro vocab")
    Vocabulary.build(["a red circle"], 1).save(work / "data" / "vocab.json")
    _fails(work, "evaluate", "models/checkpoint.pt: no checkpoint", "dvc repro scst")
    _fails(work, "scst", "models/ce.pt: no checkpoint", "dvc repro train")
    _fails(_work(tmp_path, **{"scst.epochs": 1}), "scst", "models/ce.pt: no checkpoint", "dvc repro train")


def test_bad_images_and_bad_annotations_name_the_file(tmp_path, tiny_data):
    work = _work(tmp_path, **{"resize.side": 32, "resize.workers": 1})
    shutil.copytree(tiny_data, work / "data" / "raw")
    victim = sorted((work / "data" / "raw" / "train" / "images").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated JPEG
    _fails(work, "resize", str(victim.resolve()), "truncated or corrupt", "data.on_bad_image: skip")
    victim.unlink()
    _fails(work, "resize", str(victim.resolve()), "missing file")

    work = _work(tmp_path, **{"data.source": "local", "data.images_dir": str(tmp_path),
                              "data.annotations": "inputs/data/captions.json"})
    (work / "inputs" / "data" / "captions.json").write_text('{"images": [{"id": 1}], "annotations": []}')
    _fails(work, "download", "inputs/data/captions.json: images[0] needs 'id' and 'file_name'")
    (work / "inputs" / "data" / "captions.json").write_text('{"images": [')
    _fails(work, "download", "inputs/data/captions.json: not valid JSON")


@pytest.mark.slow  # seconds of subprocesses: CI runs it, the edit-test loop does not
def test_missing_features_say_to_run_the_features_stage(tmp_path, tiny_data):
    work = _work(tmp_path, **{"model.image_size": 32})
    shutil.copytree(tiny_data, work / "data" / "resized")
    subprocess.run([sys.executable, str(REPO / "stages" / "vocab.py"), *STAGES["vocab"]], cwd=work, check=True,
                   env=venv_env(), capture_output=True)
    torch.save({k: v for k, v in resnet("resnet18").state_dict().items() if not k.startswith("fc.")},
               work / "models" / "backbone.pt") if (work / "models").mkdir() is None else None
    _fails(work, "train", "data/features/train.json: missing", "dvc repro features")


def test_an_interrupted_download_says_to_run_again_and_keeps_what_it_has(tmp_path):
    server = Loopback(coco_archives())
    try:
        work = _work(tmp_path, **{"data.source": "coco2014", "data.base_url": server.url,
                                  "data.checksums": "inputs/data/checksums.json"})
        (work / "inputs" / "data" / "checksums.json").write_text(json.dumps(
            {n: {"size": a.size, "checksum": a.checksum} for n, a in server.table().items() if n in server.files}))
        first = "caption_datasets.zip"
        server.cut_after[first] = 1000  # some bytes arrive, then the connection drops
        # A shell without job control starts background jobs with SIGINT ignored, and Python then
        # never raises KeyboardInterrupt: give the stage the default, as a terminal's Ctrl-C finds it.
        proc = subprocess.Popen([sys.executable, str(REPO / "stages" / "download.py"), *STAGES["download"]],
                                cwd=work, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size == 1000 for p in (work / "data" / "downloads").rglob(f"{first}.part")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        server.fail[first] = 10 ** 6  # and the server stays away: the stage waits to retry
        proc.send_signal(signal.SIGINT)  # the user's Ctrl-C
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1].startswith("download: interrupted; run it again to continue")
        part = next((work / "data" / "downloads").rglob(f"{first}.part"))
        assert part.stat().st_size == 1000  # kept for the resume
        assert not (work / "data" / "raw").exists()
    finally:
        server.close()


def test_a_full_disk_is_one_line_naming_where(tmp_path, capsys):
    """A real ENOSPC from the kernel (/dev/full is a device that is always full)."""
    def write_to_full_disk():
        with open("/dev/full", "wb", buffering=0) as f:
            f.write(b"x")

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    with pytest.raises(SystemExit) as stopped:
        run_stage("resize", write_to_full_disk)
    assert stopped.value.code == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("resize: no space left on the device") and "free some space" in line
    assert "\n" not in line

    def bug():
        raise OSError(errno.EACCES, "a bug, not a user's disk", "x")

    with pytest.raises(OSError):  # any other error keeps its traceback
        run_stage("resize", bug)


def test_a_bug_keeps_its_traceback(tmp_path):
    code = "from captioning.stage import run_stage\nrun_stage('x', lambda: [][1])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=venv_env())
    assert done.returncode == 1 and "Traceback" in done.stderr and "IndexError" in done.stderr
    assert os.environ.get("PATH")  # (the environment is untouched)
