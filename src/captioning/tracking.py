"""MLflow: where the store is, what a run is called, and a logger the training loop calls.

The store is `MLFLOW_TRACKING_URI` if set, else `sqlite:///<repo root>/mlflow.db` with artifacts
in `<repo root>/mlartifacts/`. The repo root is `$DVC_ROOT` when DVC runs the stage; queued
experiments run in a temporary copy under `<repo>/.dvc/tmp/exps/`, which is deleted afterwards,
so a path inside it is mapped back to the repo itself: a run logged there would be lost.

One pipeline run is one MLflow run: train starts it and records its id in a small DVC output,
evaluate reopens it by that id.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from captioning.io import write_json_atomic

EXPERIMENT = "captioning"
_FLUSH_EVERY = 200  # buffered metric points per log_batch call (one SQLite transaction each)


def repo_root(start: str | Path | None = None) -> Path:
    root = Path(start or os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or repo_root()) / 'mlflow.db'}"


def experiment_id(name: str = EXPERIMENT, root: Path | None = None) -> str:
    """Point MLflow at our store and return the experiment's id, creating it if needed.

    A local store gets an explicit, absolute artifact location under the repo root; a tracking
    server decides its own.
    """
    root = root or repo_root()
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///"):
        return _get_or_create(MlflowClient(uri), name, None)
    # Parallel queue workers would race to create a fresh SQLite store (alembic migrations are
    # not concurrency-safe): the first one creates it under an exclusive lock, the others wait.
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _get_or_create(MlflowClient(uri), name, (root / "mlartifacts").as_uri())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _get_or_create(client: MlflowClient, name: str, location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=location)


def run_name() -> str:
    return os.environ.get("DVC_EXP_NAME") or "run-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def run_tags(stage: str) -> dict[str, str]:
    tags = {"stage": stage, "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", "")}
    commit = _git_commit()
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return {k: v for k, v in tags.items() if v}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=os.environ.get("DVC_ROOT") or None)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """{'train': {'lr': 0.001}} -> {'train.lr': '0.001'}, the keys DVC uses too."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def write_run_info(path: str | Path, run: mlflow.ActiveRun) -> None:
    write_json_atomic(path, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                             "run_name": run.info.run_name})


def reopen_run(info_path: str | Path, stage: str) -> mlflow.ActiveRun:
    """Reopen the run that train recorded; a new one (same name) if this store lacks it."""
    info = json.loads(Path(info_path).read_text())
    exp = experiment_id()
    try:
        MlflowClient().get_run(info["run_id"])
        return mlflow.start_run(run_id=info["run_id"])
    except mlflow.exceptions.MlflowException:
        print(f"MLflow run {info['run_id']} is not in {tracking_uri()}; logging to a new run")
        return mlflow.start_run(experiment_id=exp, run_name=info.get("run_name"), tags=run_tags(stage))


class MetricLogger:
    """Buffers metric points and sends them in batches: one SQLite write per point is slow."""

    def __init__(self, run_id: str):
        self.run_id, self.client, self.buffer = run_id, MlflowClient(), []

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.buffer) >= _FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        for k in range(0, len(self.buffer), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=self.buffer[k:k + 1000])
        self.buffer = []
