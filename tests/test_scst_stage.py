"""The scst stage for real: in the DVC pipeline (its own stage, never rerunning train, its own
MLflow records), killed with SIGKILL and resumed, and under DistributedDataParallel."""

from __future__ import annotations

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
import torchvision
import yaml
from mlflow.tracking import MlflowClient

from captioning.io import file_digest
from conftest import REPO, venv_env
from pipeline_repo import TINY, histories, make_clone, reset, shell

pytestmark = pytest.mark.slow

SCST = {"epochs": 1, "batch_size": 8, "samples": 3, "lr": 0.01, "log_every": 1, "select_metric": "last"}


def test_scst_is_a_stage_of_its_own_with_its_own_records(tmp_path):
    """train + scst + evaluate in one pipeline run make one MLflow run; scst.epochs 0 passes
    train's checkpoint on byte for byte; changing scst.* reruns scst (and evaluate), never train."""
    clone, env = make_clone(tmp_path, {**TINY, "scst": SCST})
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    out = shell(["dvc", "repro"], clone, env)
    assert "Running stage 'train'" in out and "Running stage 'scst'" in out
    [run] = client.search_runs([client.get_experiment_by_name("captioning").experiment_id])
    logged = histories(client, run)
    steps = json.loads((clone / "metrics" / "scst.json").read_text())["steps"]
    assert [s for s, _ in logged["scst_reward"]] == list(range(1, steps + 1))
    assert {"scst_baseline", "scst_advantage", "train_loss", "test_cider"} <= set(logged)
    assert [s for s, _ in logged["scst_val_cider"]] == [0, 1]  # epoch 0: train's model
    ce_md5 = file_digest(clone / "models" / "ce.pt", "md5")
    stored = torch.load(clone / "models" / "checkpoint.pt", weights_only=True)["params"]
    assert stored["scst"]["from_checkpoint_md5"] == ce_md5 and stored["scst"]["kept_epoch"] == 1
    assert stored["scst"]["lr"] == 0.01 and stored["train"]["epochs"] == TINY["train"]["epochs"]
    plots = (clone / "plots" / "scst" / "steps.csv").read_text().splitlines()
    assert plots[0].startswith("step,epoch,loss,reward,baseline,advantage") and len(plots) == steps + 1
    shell(["git", "add", "-A"], clone, env)
    shell(["git", "commit", "-q", "-m", "pipeline run"], clone, env)

    out = shell(["dvc", "exp", "run", "-S", "scst.epochs=0"], clone, env)
    assert "Running stage 'scst'" in out and "Running stage 'train'" not in out
    assert (clone / "models" / "checkpoint.pt").read_bytes() == (clone / "models" / "ce.pt").read_bytes()
    trained = json.loads((clone / "metrics" / "train.json").read_text())
    passed = json.loads((clone / "metrics" / "scst.json").read_text())
    assert passed == {"best_epoch": 0, "steps": 0, **{k: v for k, v in trained.items() if k.startswith("val_")}}
    info = json.loads((clone / "reports" / "mlflow_run.json").read_text())
    assert info["train_run_id"] == run.info.run_id  # evaluate-only, linked to the run that trained it
    reset(clone, env)

    out = shell(["dvc", "exp", "run", "-S", "scst.lr=0.02"], clone, env)
    assert "Running stage 'scst'" in out and "Running stage 'train'" not in out
    info = json.loads((clone / "reports" / "mlflow_run.json").read_text())
    own = client.get_run(info["run_id"])
    assert own.data.tags["stage"] == "scst" and own.data.tags["captioning.train_run_id"] == run.info.run_id
    assert info["train_run_id"] == own.info.run_id  # evaluate logged into scst's run
    logged = histories(client, own)
    assert {"train_loss", "scst_reward", "test_cider"} <= set(logged) and own.data.params["scst.lr"] == "0.02"
    assert client.get_run(run.info.run_id).data.metrics == run.data.metrics  # the earlier run is unchanged


def _work(tiny_data, tmp_path: Path, decoder: str = "lstm", **scst) -> tuple[Path, dict, dict]:
    """A work folder holding tiny_data, its vocab, a random backbone, its features and train's
    cross-entropy checkpoint (ce.pt), with params for scst."""
    work = tmp_path / "work"
    work.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(image_size=32, embed_size=16, hidden_size=24, attention_size=8, decoder=decoder)
    params["train"].update(epochs=1, batch_size=40, log_every=1)
    params["scst"].update({**SCST, "epochs": 3, "checkpoint_every": 2, **scst})
    params["compute"].update(num_workers=0)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(tiny_data, work / "raw")
    # torchrun gives each of 2 processes one thread, a single process all of them: one thread
    # everywhere makes the kernels sum in the same order.
    env = dict(venv_env(), OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")

    def stage(name: str, *args: str) -> None:
        subprocess.run([sys.executable, str(REPO / "stages" / f"{name}.py"), *args], cwd=work, env=env, check=True,
                       capture_output=True)

    stage("vocab", "--data", "raw", "--out", "vocab.json")
    torch.manual_seed(0)
    torch.save({k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")},
               work / "backbone.pt")
    stage("features", "--data", "raw", "--backbone", "backbone.pt", "--out", "features")
    stage("train", "--data", "raw", "--vocab", "vocab.json", "--backbone", "backbone.pt", "--features", "features",
          "--pretrain-curve", "none.csv", "--checkpoint", "ce.pt", "--metrics", "train.json", "--plots", "plots",
          "--resume-dir", "resume")
    return work, env, params


def _scst(tag: str) -> list[str]:
    return [sys.executable, str(REPO / "stages" / "scst.py"), "--data", "raw", "--features", "features",
            "--ce-checkpoint", "ce.pt", "--train-metrics", "train.json", "--checkpoint", f"{tag}/checkpoint.pt",
            "--metrics", f"{tag}/scst.json", "--plots", f"{tag}/plots", "--resume-dir", "resume"]


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_kill_9_during_scst_then_rerun_resumes_to_identical_weights(tiny_data, tmp_path):
    work, env, _ = _work(tiny_data, tmp_path)
    subprocess.run(_scst("straight"), cwd=work, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(_scst("killed"), cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # kill once a resume checkpoint exists and the run has moved past it
        if "scst epoch [2/3], step [2/" in line and list((work / "resume").glob("scst-*.pt")):
            os.kill(proc.pid, signal.SIGKILL)
            break
        assert time.monotonic() < deadline
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (work / "killed" / "checkpoint.pt").exists()
    rerun = subprocess.run(_scst("killed"), cwd=work, env=env, check=True, capture_output=True, text=True)
    assert "resumed from" in rerun.stdout
    a, b = _weights(work / "straight" / "checkpoint.pt"), _weights(work / "killed" / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("steps.csv", "val.csv"):
        assert (work / "killed" / "plots" / name).read_text() == (work / "straight" / "plots" / name).read_text()
    assert not list((work / "resume").iterdir())  # a finished run leaves no resume state
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("captioning").experiment_id],
                              filter_string="tags.stage = 'scst'", order_by=["attributes.start_time DESC"])
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "scst_reward")]
    assert sorted(steps) == list(range(1, len(steps) + 1)) and runs[0].data.tags["captioning.resumed"] == "yes"


@pytest.mark.parametrize("decoder", ["attention"])
def test_scst_under_ddp_trains_on_both_processes_and_rank_0_writes(tiny_data, tmp_path, decoder):
    work, env, params = _work(tiny_data, tmp_path, decoder, epochs=1)
    params["train"]["processes"] = 2
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run(_scst("ddp"), cwd=work, env=env, check=True, capture_output=True, text=True).stdout
    assert "torch.distributed.run" in out and "x 2 processes" in out
    stored = torch.load(work / "ddp" / "checkpoint.pt", weights_only=True)
    assert stored["params"]["scst"]["kept_epoch"] == 1 and stored["params"]["model"]["decoder"] == decoder
    ce = _weights(work / "ce.pt")
    assert any(not torch.equal(ce[k], stored["state_dict"][k]) for k in ce)
