"""MLflow: where the store is, what a run is called, and a logger the training loop calls.

The store is `MLFLOW_TRACKING_URI` if set, else `sqlite:///<repo root>/mlflow.db` with artifacts
in `<repo root>/mlartifacts/`. The repo root is `$DVC_ROOT` when DVC runs the stage; queued
experiments run in a temporary copy under `<repo>/.dvc/tmp/exps/`, which is deleted afterwards,
so a path inside it is mapped back to the repo itself: a run logged there would be lost.

One pipeline run is one MLflow run, named after the DVC experiment. Train starts it and records
its id in a small DVC output; evaluate logs into it when this pipeline run trained the checkpoint,
and otherwise starts a run of its own linked to the one that did (`evaluation_run`). Evaluate
records the experiment's run in its own output, so a run-cache restore points at the run that
produced the results it restores.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric
import yaml
from mlflow.tracking import MlflowClient

from captioning.io import write_json_atomic
from captioning.params import ParamsError, flatten, load_params, parse_params

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


# MLflow 3 opens an experiment without this tag as a GenAI one (traces, an empty dashboard);
# with it the UI opens on the runs table.
KIND = {"mlflow.experimentKind": "custom_model_development"}


def _get_or_create(client: MlflowClient, name: str, location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, artifact_location=location, tags=KIND)
    for key, value in KIND.items():
        if found.tags.get(key) != value:  # a store made before the tag was set
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def run_name() -> str:
    """The DVC experiment's name under `dvc exp run`; for a plain `dvc repro`, the workspace of
    the branch and commit it started from, the way `dvc exp show` names that row."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    commit, branch = _git("rev-parse", "--short", "HEAD"), _git("branch", "--show-current")
    return f"workspace ({branch or 'detached'} @ {commit})" if commit else "workspace"


def run_tags(stage: str) -> dict[str, str]:
    tags = {"stage": stage, "dvc.exp_name": os.environ.get("DVC_EXP_NAME") or "workspace",
            "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD"),
            "git.branch": _git("branch", "--show-current")}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return {k: v for k, v in tags.items() if v}


def _git(*args: str, cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                             cwd=cwd or os.environ.get("DVC_ROOT") or None)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def flat_text(nested: dict) -> dict[str, str]:
    """{'train': {'lr': 0.001}} -> {'train.lr': '0.001'}: params as MLflow stores them."""
    return {key: str(value) for key, value in flatten(nested).items()}


def pipeline_params(params_path: str | Path) -> dict[str, str]:
    """Every param of the pipeline run, flat: what its MLflow run records (all of them, so that
    two runs compare key by key in the UI)."""
    return flat_text(load_params(params_path).to_dict())


def changed_params(params_path: str | Path) -> dict[str, tuple[str, str]] | None:
    """{key: (baseline value, this run's)} against the params file of the baseline commit (the
    DVC experiment's baseline, else HEAD); None when there is no commit to compare with."""
    path = Path(params_path).resolve()
    rev = os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"
    text = _git("show", f"{rev}:./{path.name}", cwd=path.parent)
    if not text:
        return None
    try:
        before = flat_text(parse_params(yaml.safe_load(text) or {}).to_dict())
    except (ParamsError, yaml.YAMLError):  # a baseline of an older schema: compare key by key
        before = flat_text(yaml.safe_load(text) or {})
    now = pipeline_params(path)
    return {k: (before.get(k, "(absent)"), v) for k, v in now.items() if before.get(k) != v}


def describe_changes(changed: dict[str, tuple[str, str]] | None) -> str:
    if changed is None:
        return "no baseline commit to compare params with"
    if not changed:
        return "params as in the baseline commit"
    return "changed against the baseline: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())


def start_pipeline_run(params_path: str | Path, stage: str, tags: dict[str, str] | None = None,
                       note: str = "") -> mlflow.ActiveRun:
    """A new MLflow run for this pipeline run, named after the experiment, holding every param.

    Its description (the first thing the run page shows) says what changed against the baseline,
    then `note`; the same list is the `params.changed` tag, a column the runs table can show.
    """
    changed = changed_params(params_path)
    summary = describe_changes(changed) + note
    run = mlflow.start_run(experiment_id=experiment_id(), run_name=run_name(), description=summary,
                           tags={**run_tags(stage), **(tags or {}),
                                 "params.changed": ", ".join(f"{k}={b}" for k, (_, b) in (changed or {}).items())
                                 or "(none)"})
    mlflow.log_params(pipeline_params(params_path))
    return run


def write_run_info(path: str | Path, run: mlflow.ActiveRun, **extra) -> None:
    write_json_atomic(path, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                             "run_name": run.info.run_name, **extra})


def evaluation_run(params_path: str | Path, train_info_path: str | Path) -> tuple[mlflow.ActiveRun, str | None]:
    """The run evaluate logs into, and the id of the run that trained the checkpoint.

    Train's own run when this pipeline run trained the checkpoint: that run has no test scores
    yet and holds exactly today's params. Otherwise (train was cached, or its run is in another
    store) a new run, tagged `captioning.train_run_id`, that starts with a copy of the training
    curves and validation metrics: one run holds the whole experiment, and no earlier run's
    params or metrics ever change.
    """
    info = json.loads(Path(train_info_path).read_text())
    experiment_id()
    client = MlflowClient()
    try:
        trained = client.get_run(info["run_id"])
    except mlflow.exceptions.MlflowException:
        trained = None
    if (trained is not None and not any(k.startswith("test_") for k in trained.data.metrics)
            and trained.data.params == pipeline_params(params_path)):
        return mlflow.start_run(run_id=trained.info.run_id), trained.info.run_id
    link = {"captioning.train_run_id": info["run_id"], "captioning.train_run_name": info.get("run_name", "")}
    where = (f"run {info.get('run_name')} ({info['run_id']})" if trained is not None
             else f"run {info['run_id']}, which is not in {tracking_uri()}")
    note = f". Evaluate only: the checkpoint was trained in {where}; its curves are copied here."
    run = start_pipeline_run(params_path, "evaluate", tags=link, note=note)
    if trained is not None:
        # the training run's own test scores are of its own evaluation, not this one
        _copy_metrics(client, trained.info.run_id, run.info.run_id,
                      [k for k in trained.data.metrics if not k.startswith("test_")])
    return run, info["run_id"]


def _copy_metrics(client: MlflowClient, source: str, target: str, keys) -> None:
    logger = MetricLogger(target, client)
    for key in keys:
        for point in client.get_metric_history(source, key):
            logger.buffer.append(Metric(key, point.value, point.timestamp, point.step))
    logger.flush()


class MetricLogger:
    """Buffers metric points and sends them in batches: one SQLite write per point is slow."""

    def __init__(self, run_id: str, client: MlflowClient | None = None):
        self.run_id, self.client, self.buffer = run_id, client or MlflowClient(), []

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.buffer) >= _FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        for k in range(0, len(self.buffer), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=self.buffer[k:k + 1000])
        self.buffer = []
