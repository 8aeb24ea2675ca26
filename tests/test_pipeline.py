"""End to end: the real `dvc repro` and `dvc exp run` in a temporary git clone, the real MLflow
store they write, read back with MlflowClient."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, venv_env

pytestmark = pytest.mark.slow

TINY = {
    "data": {"num_train": 40, "num_val": 8, "num_test": 8, "min_side": 100, "max_side": 160, "workers": 2},
    "resize": {"size": 64, "workers": 2},
    "model": {"image_size": 32, "embed_size": 16, "hidden_size": 24},
    "pretrain": {"epochs": 1, "batch_size": 16},
    "train": {"epochs": 2, "batch_size": 40, "log_every": 1},
    "evaluate": {"gallery_size": 4},
    "compute": {"num_workers": 0},
}


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) else value
    return out


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def make_clone(tmp_path: Path, params_override: dict) -> tuple[Path, dict]:
    """A git repo holding the project's pipeline, with `params_override` applied and committed."""
    clone = tmp_path / "repo"
    clone.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "stages", "src"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, clone / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, clone / name)
    (clone / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", clone / ".dvc" / "config")
    shutil.copy2(REPO / ".dvc" / ".gitignore", clone / ".dvc" / ".gitignore")
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), params_override)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = venv_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: <repo root>/mlflow.db
    env["PYTHONPATH"] = str(clone / "src")  # run the clone's code, which DVC hashes
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com")
    _run(["git", "init", "-q", "-b", "main"], clone, env)
    _run(["git", "add", "-A"], clone, env)
    _run(["git", "commit", "-q", "-m", "baseline"], clone, env)
    return clone, env


def test_repro_then_noop_then_experiment(tmp_path):
    clone, env = make_clone(tmp_path, TINY)

    out = _run(["dvc", "repro"], clone, env)
    for stage in ("download", "vocab", "resize", "pretrain", "features", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((clone / "metrics" / "evaluate.json").read_text())
    for key in ("bleu_1", "bleu_4", "meteor", "rouge_l", "cider", "grounded"):
        assert 0 <= metrics[key] <= 10, key
    assert (clone / "dvc.lock").is_file()
    assert (clone / "reports" / "gallery.html").read_text().count("<img") == 4
    results = json.loads((clone / "reports" / "test_captions.json").read_text())
    assert len(results) == 8 and set(results[0]) == {"image_id", "caption"}

    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("captioning")
    assert experiment.artifact_location == (clone / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["test_cider"] == pytest.approx(metrics["cider"])
    lr = yaml.safe_load((clone / "params.yaml").read_text())["train"]["lr"]  # the run's own value
    assert run.data.params["train.lr"] == str(lr) and run.data.params["model.hidden_size"] == "24"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "evaluate"} <= artifacts
    assert json.loads((clone / "models" / "mlflow_run.json").read_text())["run_id"] == run.info.run_id

    out = _run(["dvc", "repro"], clone, env)
    assert "Running stage" not in out
    assert "up to date" in _run(["dvc", "status"], clone, env)

    _run(["git", "add", "-A"], clone, env)
    _run(["git", "commit", "-q", "-m", "pipeline run"], clone, env)
    out = _run(["dvc", "exp", "run", "-S", "train.lr=0.0005"], clone, env)
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    for stage in ("download", "vocab", "resize", "pretrain", "features"):  # features are not recomputed
        assert f"Running stage '{stage}'" not in out
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], clone, env))
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    assert exps, shown
    exp_name = exps[0]["name"]
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == 2
    assert runs[0].info.run_name == exp_name
    assert runs[0].data.params["train.lr"] == "0.0005"
    assert runs[0].data.tags["dvc.baseline_rev"] == _run(["git", "rev-parse", "HEAD"], clone, env).strip()
    assert "test_bleu_4" in runs[0].data.metrics


def test_train_under_torchrun_with_two_processes(tmp_path):
    """train.processes: 2 relaunches train under torchrun (gloo on CPU): one MLflow run, one
    checkpoint, and evaluate scores it."""
    clone, env = make_clone(tmp_path, _merge(TINY, {"train": {"processes": 2}}))
    out = _run(["dvc", "repro"], clone, env)
    assert "torch.distributed.run" in out and "x 2 processes" in out
    metrics = json.loads((clone / "metrics" / "evaluate.json").read_text())
    assert 0 <= metrics["cider"] <= 10
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("captioning").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["train.processes"] == "2"
    assert "test_cider" in runs[0].data.metrics
