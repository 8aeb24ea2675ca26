"""End to end: the real `dvc repro` and `dvc exp run` in a temporary git clone, the real MLflow
store they write, read back with MlflowClient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline_repo import TINY, histories, make_clone, reset, shell

pytestmark = pytest.mark.slow

def test_one_mlflow_run_per_experiment_and_the_record_never_changes(tmp_path):
    """Baseline, an evaluate-only experiment, a training experiment and a run-cache restore of it:
    one MLflow run per distinct experiment, each holding its own params, curves and test scores,
    and no run changes after its pipeline run ends."""
    clone, env = make_clone(tmp_path, TINY)
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")

    out = shell(["dvc", "repro"], clone, env)
    for stage in ("download", "vocab", "resize", "pretrain", "features", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    experiment = client.get_experiment_by_name("captioning")
    assert experiment.artifact_location == (clone / "mlartifacts").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs
    [baseline] = client.search_runs([experiment.experiment_id])
    assert baseline.info.run_name.startswith("workspace (main @ ")
    assert baseline.data.tags["dvc.exp_name"] == "workspace"
    assert json.loads((clone / "reports" / "mlflow_run.json").read_text())["run_id"] == baseline.info.run_id
    assert json.loads((clone / "reports" / "mlflow_run.json").read_text())["tracking"] == "local"
    assert "gallery.html" in {a.path for a in client.list_artifacts(baseline.info.run_id)}  # compare view
    assert (clone / "reports" / "gallery.html").read_text().count("<img") == 4
    results = json.loads((clone / "reports" / "test_captions.json").read_text())
    assert len(results) == 8 and set(results[0]) == {"image_id", "caption"}
    metrics = json.loads((clone / "metrics" / "evaluate.json").read_text())
    assert baseline.data.metrics["test_cider"] == pytest.approx(metrics["cider"])
    before = histories(client, baseline)
    assert len(before["train_loss"]) >= 2 and len(before["val_loss"]) == 2
    assert {"val_grounded", "val_strict"} <= set(before) and all(v == v for h in before.values() for _, v in h)  # no NaN
    assert "up to date" in shell(["dvc", "status"], clone, env)
    assert "Running stage" not in shell(["dvc", "repro"], clone, env)
    # The checkpoint stores what train depends on, nothing more (no evaluate.* to decode with).
    stored = torch.load(clone / "models" / "checkpoint.pt", weights_only=True)["params"]
    assert set(stored) == set(yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]["train"]["params"])
    shell(["git", "add", "-A"], clone, env)
    shell(["git", "commit", "-q", "-m", "pipeline run"], clone, env)
    head = shell(["git", "rev-parse", "HEAD"], clone, env).strip()

    out = shell(["dvc", "exp", "run", "-n", "beam1", "-S", "evaluate.beam_size=1"], clone, env)
    assert "Running stage 'evaluate'" in out and "Running stage 'train'" not in out
    beam1_info = json.loads((clone / "reports" / "mlflow_run.json").read_text())
    assert json.loads((clone / "models" / "decoding.json").read_text())["beam_size"] == 1
    beam1_model = beam1_info["model_uri"]
    reset(clone, env)

    out = shell(["dvc", "exp", "run", "-n", "slow", "-S", "train.lr=0.0005"], clone, env)
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    for stage in ("download", "vocab", "resize", "pretrain", "features"):  # features are not recomputed
        assert f"Running stage '{stage}'" not in out
    slow_id = json.loads((clone / "reports" / "mlflow_run.json").read_text())["run_id"]
    reset(clone, env)

    out = shell(["dvc", "exp", "run", "-n", "slow-again", "-S", "train.lr=0.0005"], clone, env)
    assert "Running stage 'train'" not in out and "Running stage 'evaluate'" not in out  # DVC's run-cache
    assert json.loads((clone / "reports" / "mlflow_run.json").read_text())["run_id"] == slow_id
    reset(clone, env)

    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted([baseline.info.run_name, "beam1", "slow"])  # no duplicate
    beam1, slow = runs["beam1"], runs["slow"]
    assert beam1.info.run_id == beam1_info["run_id"] and slow.info.run_id == slow_id
    # Every earlier run exactly as its own pipeline run left it.
    assert histories(client, runs[baseline.info.run_name]) == before
    assert runs[baseline.info.run_name].data.params == baseline.data.params
    # Each run's params are the ones its metrics came from.
    lr = str(yaml.safe_load((clone / "params.yaml").read_text())["train"]["lr"])
    assert (baseline.data.params["train.lr"], baseline.data.params["evaluate.beam_size"]) == (lr, "3")
    assert (beam1.data.params["train.lr"], beam1.data.params["evaluate.beam_size"]) == (lr, "1")
    assert (slow.data.params["train.lr"], slow.data.params["evaluate.beam_size"]) == ("0.0005", "3")
    for run in (beam1, slow):
        assert run.data.tags["dvc.exp_name"] == run.info.run_name
        assert run.data.tags["dvc.baseline_rev"] == head
        history = histories(client, run)
        assert all(len(history[k]) == 1 for k in history if k.startswith("test_"))
        assert {"test_bleu_4", "test_cider", "test_grounded", "test_strict", "train_loss", "val_loss"} <= set(history)
    assert "train.lr" in slow.data.tags["params.changed"] and "0.0005" in slow.data.tags["params.changed"]
    # The evaluate-only run links to the run that trained its checkpoint and holds its curves.
    assert beam1.data.tags["captioning.train_run_id"] == baseline.info.run_id
    assert histories(client, beam1)["train_loss"] == before["train_loss"]
    assert beam1.data.metrics["test_bleu_4"] != runs[baseline.info.run_name].data.metrics["test_bleu_4"] \
        or beam1.data.metrics["test_cider"] != runs[baseline.info.run_name].data.metrics["test_cider"]
    # What is served is what was evaluated: beam1's model decodes greedily; one weight file a run.
    model_id = client.search_logged_models([experiment.experiment_id],
                                           filter_string=f"source_run_id = '{beam1.info.run_id}'")[0].model_id
    assert beam1_model == "models:/captioner/2"  # the baseline's model is version 1
    assert client.get_model_version("captioner", "2").run_id == beam1.info.run_id
    local = Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    assert json.loads((local / "artifacts" / "decoding.json").read_text())["beam_size"] == 1
    weights = sorted((clone / "mlartifacts").rglob("*.pt"))
    assert len(weights) == 3 and all(w.name == "checkpoint.pt" for w in weights)
    assert all(p.stat().st_size < 100_000 for p in (clone / "mlartifacts").rglob("python_model.pkl"))
