"""bench/dev_scores.py end to end on a tiny dataset: the stages build what it reads, it trains a
decoder with the overrides given and scores the val images past the ones that pick the epoch."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, venv_env


def run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=venv_env(), capture_output=True, text=True,
                            check=False, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_dev_scores_trains_on_a_prefix_and_scores_the_dev_images(tiny_data, tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["pretrain"].update(epochs=1, batch_size=16)
    params["resize"]["side"] = 64
    params["train"].update(epochs=1, batch_size=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p, d = str(tmp_path / "params.yaml"), tmp_path
    run("stages/resize.py", "--params", p, "--data", str(tiny_data), "--out", str(d / "resized"))
    run("stages/vocab.py", "--params", p, "--data", str(d / "resized"), "--out", str(d / "vocab.json"))
    run("stages/weights.py", "--params", p, "--out", str(d / "imagenet.json"), "--inputs", "inputs/model",
        "--data-inputs", "inputs/data")
    run("stages/pretrain.py", "--params", p, "--data", str(d / "resized"), "--weights", str(d / "imagenet.json"),
        "--out", str(d / "backbone.pt"), "--metrics", str(d / "pretrain.json"), "--plots", str(d / "loss.csv"))
    run("stages/features.py", "--params", p, "--data", str(d / "resized"), "--backbone", str(d / "backbone.pt"),
        "--out", str(d / "features"))
    common = ["bench/dev_scores.py", "--params", p, "--data", str(d / "resized"), "--backbone", str(d / "backbone.pt"),
              "--features", str(d / "features"), "--vocab", str(d / "vocab.json"), "--val-images", "4"]
    result = run(*common, "--dev-images", "8", "--n-train", "32", "-S", "train.epochs=2")
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("32 train images, ['train.epochs=2']: kept epoch ")
    grounded, strict = map(float, re.search(r"dev grounded ([\d.]+) .* strict ([\d.]+)$", line).groups())
    assert 0 <= grounded <= 1 and 0 <= strict <= 1
    assert result.stdout.count("  epoch ") == 2  # one validation line per epoch: the override took

    too_many = subprocess.run([sys.executable, *common, "--dev-images", "9"], cwd=REPO, env=venv_env(),
                              capture_output=True, text=True, check=False, timeout=600, stdin=subprocess.DEVNULL)
    assert too_many.returncode != 0 and "need 13 (data.num_val)" in too_many.stderr
