"""bench/gpu_pipeline.sh on a CPU: every step but CUDA (no GPU here), and the scoring of its
captions back on this side."""

import json
import os
import subprocess

import pytest

from conftest import REPO, venv_env


@pytest.mark.slow
def test_the_gpu_script_runs_every_step_on_a_cpu_and_its_captions_score_here(tmp_path):
    env = {**venv_env(), "DEVICE": "cpu", "OUT": str(tmp_path / "out"), "WHEELS": ""}  # the venv has them
    env.pop("MLFLOW_TRACKING_URI", None)  # the script keeps its MLflow store in its scratch copy
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_pipeline.sh"), "--quick", "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_pipeline.json").read_text())
    assert list(results["pipeline_seconds"]) == ["download", "resize", "vocab", "weights", "pretrain", "features",
                                                 "train", "scst"]
    assert len(results["test_captions"]["captions"]) == 8 and results["test_captions"]["decoding"] == "beam 3, length penalty 0.5"
    seed = results["seed_model"]
    assert seed["features_images"] == 16 + 8 and seed["train_steps"] >= 1 and seed["captioned"] == 8
    for row in ("default pipeline: train", "captions/s", "images/s", "steps/s"):
        assert row in done.stdout
    # the scratch pipeline ran on the params asked for, and wrote no file into this repo
    params = (tmp_path / "work" / "repo" / "params.yaml").read_text()
    assert "device: cpu" in params
    scored = subprocess.run(["python", str(REPO / "bench" / "gpu_pipeline.py"), "--score",
                             str(tmp_path / "out" / "gpu_pipeline.json"), "--data",
                             str(tmp_path / "work" / "repo" / "data" / "resized"), "--metrics", str(tmp_path / "none")],
                            capture_output=True, text=True, env=venv_env(), timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    for metric in ("bleu_4", "meteor", "cider", "grounded", "strict"):
        assert f"| {metric} |" in scored.stdout
    assert os.path.isdir(tmp_path / "work" / "seed")
