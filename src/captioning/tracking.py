"""MLflow: where the store is, what a run is called and holds, and the logger the training loop calls.

The store is `MLFLOW_TRACKING_URI` if set (a team's tracking server: docs/team.md), else
`sqlite:///<repo root>/mlflow.db` with artifacts in `<repo root>/mlartifacts/`. The repo root is
`$DVC_ROOT` when DVC runs the stage; queued experiments run in a temporary copy under
`<repo>/.dvc/tmp/exps/`, which is deleted afterwards, so a path inside it is mapped back to the
repo itself: a run logged there would be lost. Every stage that logs checks the store first
(`connect`), so a server that is down stops the stage before any work, in one line.

One pipeline run is one MLflow run, named after the DVC experiment. Train starts it, tagged with
the pipeline run (`lineage.pipeline_run`) and the md5 of the checkpoint it wrote; scst logs into
it when the same pipeline run trained that checkpoint, else into a run of its own linked to the
run that did (`scst_run`), and tags the run with the md5 of the checkpoint it wrote. Evaluate logs
into the run that wrote its checkpoint when the same pipeline run did, and otherwise starts a run
of its own linked to the newest such run (`evaluation_run`). Only evaluate's output names the run
(`reports/mlflow_run.json`): every other DVC output is the same on every box.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import mlflow
import yaml
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from requests.exceptions import RequestException

from captioning import lineage
from captioning.errors import UserError
from captioning.io import file_digest, write_json_atomic
from captioning.metrics import val_key
from captioning.params import ParamsError, flatten, load_params, parse_params

EXPERIMENT = "captioning"
PIPELINE_RUN = "captioning.pipeline_run"  # tag: the pipeline run (lineage.pipeline_run) that made the run
CHECKPOINT_MD5 = "captioning.checkpoint_md5"  # tag: the md5 of the checkpoint the run trained or evaluated
TRAIN_RUN = "captioning.train_run_id"  # tag of an evaluate-only run: the run that trained its checkpoint
SCST_MD5 = "captioning.scst_checkpoint_md5"  # tag: the md5 of the checkpoint the run's self-critical training wrote
ARTIFACTS = "storing the run's artifacts"
_FLUSH_EVERY = 200  # buffered metric points per log_batch call (one SQLite transaction each)
# Run-level curves that describe what a pipeline run did itself: an evaluate-only run does not copy them.
_OWN_METRICS = ("system/", "stage_seconds/")


class TrackingError(UserError):
    """The MLflow store is unreachable, refuses, or cannot store artifacts."""


def repo_root(start: str | Path | None = None) -> Path:
    root = Path(start or os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or repo_root()) / 'mlflow.db'}"


def store_label(uri: str | None = None) -> str:
    """Where runs live, as a versioned file may say it: "local" for a store on this box, else the
    server's URI without credentials, query or fragment."""
    parts = urlsplit(uri or tracking_uri())
    if parts.scheme in ("", "file", "sqlite"):
        return "local"
    try:
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    except ValueError:  # a malformed port: keep the host alone
        host = parts.hostname or ""
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


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
        try:
            return client.create_experiment(name, artifact_location=location, tags=KIND)
        except MlflowException as err:  # another box or queue worker created it in between
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)
    for key, value in KIND.items():
        if found.tags.get(key) != value:  # a store made before the tag was set
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


# MLflow retries a failed request 7 times with exponential backoff (minutes in all): right in the
# middle of a run, too long for a store that is simply not there.
_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
          "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


@contextmanager
def _quick():
    saved = {key: os.environ.get(key) for key in _QUICK}
    os.environ.update(_QUICK)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_ERRORS = (MlflowException, RequestException, OSError)


def connect() -> str:
    """Check that the store answers, before the stage does any work; return the experiment's id.

    A server that is down, refuses or is not an MLflow server stops the stage with one line
    naming `MLFLOW_TRACKING_URI` and the fix.
    """
    try:
        with _quick():
            return experiment_id()
    except _ERRORS as err:
        raise TrackingError(explain(err)) from None


def explain(err: Exception, doing: str = "") -> str:
    """One line: which store, what went wrong, and the fix."""
    text = " ".join(str(err).split())
    where = (f"MLFLOW_TRACKING_URI={store_label()}" if os.environ.get("MLFLOW_TRACKING_URI")
             else f"the local MLflow store {tracking_uri()}")
    code = re.search(r"error code (\d{3})|status code (\d{3})|HTTP (\d{3})|too many (\d{3}) error", text)
    status = next((g for g in code.groups() if g), "") if code else ""
    if status in ("401", "403") or "PERMISSION_DENIED" in text or "UNAUTHENTICATED" in text:
        why = ("the server refused the request (not authorised): set MLFLOW_TRACKING_USERNAME and "
               "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN")
    elif status == "404" or "ENDPOINT_NOT_FOUND" in text:
        why = "something answers there, but not an MLflow tracking server (HTTP 404): check the address and port"
    elif ARTIFACTS in doing or re.search(r"credentials|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|"
                                         r"NoSuchBucket", text):
        # The tracking API answered a moment before (`connect`), so a failed upload is the artifact
        # side: a proxying server drops the connection when its S3 store refuses.
        why = ("the artifact store refused (S3 credentials or bucket): give the tracking server (or this box, "
               "for an s3:// artifact root) AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL "
               "for an S3-compatible store, and an existing bucket; the server's log says which (docs/team.md)")
    elif status.startswith("5"):
        why = f"the server failed (HTTP {status}): its log says why"
    elif re.search(r"Connection refused|Max retries exceeded|Failed to establish|timed out|Name or service not "
                   r"known|Temporary failure in name resolution|RemoteDisconnected|Connection (aborted|reset)", text):
        why = ("no MLflow server answers there: start it (docs/team.md), correct the address, or unset "
               "MLFLOW_TRACKING_URI to log to ./mlflow.db")
    else:
        why = text[:300]
    return f"{where}: {doing + ': ' if doing else ''}{why}"


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
            "git.branch": _git("branch", "--show-current"), PIPELINE_RUN: lineage.pipeline_run()}
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
                       note: str = "", system_metrics: bool = False) -> mlflow.ActiveRun:
    """A new MLflow run for this pipeline run, named after the experiment, holding every param.

    Its description (the first thing the run page shows) says what changed against the baseline,
    then `note`; the same list is the `params.changed` tag, a column the runs table can show. The
    params file is its first artifact: a store that cannot keep artifacts stops the stage here.
    """
    changed = changed_params(params_path)
    summary = describe_changes(changed) + note
    run = mlflow.start_run(experiment_id=experiment_id(), run_name=run_name(), description=summary,
                           log_system_metrics=system_metrics,
                           tags={**run_tags(stage), **(tags or {}),
                                 "params.changed": ", ".join(f"{k}={b}" for k, (_, b) in (changed or {}).items())
                                 or "(none)"})
    try:
        mlflow.log_params(pipeline_params(params_path))
        log_params_file(params_path)
    except BaseException:
        _end(run, "FAILED")
        raise
    return run


def log_params_file(params_path: str | Path) -> None:
    """The params file as an artifact of the active run, quickly: a store whose artifact side fails
    (missing S3 credentials, say) stops the stage in one line before any work."""
    try:
        with _quick():
            mlflow.log_artifact(str(params_path))
    except _ERRORS as err:
        raise TrackingError(explain(err, ARTIFACTS)) from None


@contextmanager
def active(run: mlflow.ActiveRun):
    """Like `with run:`, but a run that fails ends as FAILED without a second error from a server
    that went away, and a run that ends well must be marked so: else one line, not a traceback."""
    try:
        yield run
    except (MlflowException, RequestException) as err:
        _end(run, "FAILED")
        raise TrackingError(explain(err)) from None
    except BaseException:
        _end(run, "FAILED")
        raise
    try:
        mlflow.end_run()
    except _ERRORS as err:
        raise TrackingError(explain(err, f"ending run {run.info.run_id}")) from None


def _end(run: mlflow.ActiveRun, status: str) -> None:
    try:
        with _quick():
            mlflow.end_run(status)  # leaves the run even when the store does not answer
    except _ERRORS:  # the store is what failed: the run stays RUNNING there
        pass


def training_run(params_path: str | Path, record: Path, resuming: bool,
                 epochs: int) -> tuple[mlflow.ActiveRun, TrainingLogs]:
    """The run train logs into, and its callbacks (which skip the steps and epochs it holds already).

    `record` (beside the resume state) names the run an earlier try of this same training started.
    When that try was cut off (killed, or the server went away) after saving resume state
    (`resuming`) and its run is still in the store, the resumed training continues it, so one
    training is one run with every point once; otherwise a new run, with system metrics.
    """
    client = MlflowClient()
    earlier = _saved_run(client, record) if resuming else None
    if earlier is None:
        run = start_pipeline_run(params_path, "train", system_metrics=True)
        write_json_atomic(record, {"run_id": run.info.run_id})
        return run, TrainingLogs(run.info.run_id, epochs)
    run = mlflow.start_run(run_id=earlier.info.run_id, log_system_metrics=True)
    mlflow.set_tags({PIPELINE_RUN: lineage.pipeline_run(), "captioning.resumed": "yes"})
    last = {key: max((m.step for m in client.get_metric_history(run.info.run_id, key)), default=0)
            for key in ("train_loss", "val_loss")}
    return run, TrainingLogs(run.info.run_id, epochs, last["train_loss"], last["val_loss"])


def log_training_inputs(data: str | Path, pretrain_curve: str | Path) -> None:
    """What train reads, in its run: the train and val splits, the earlier stages' times and
    pretrain's loss curve (when pretrain ran)."""
    log_datasets({split: (str(Path(data) / split), CONTEXTS[split]) for split in ("train", "val")})
    log_stage_times(lineage.stage_times(before="train"))
    if Path(pretrain_curve).is_file():
        log_curve(mlflow.active_run().info.run_id, pretrain_curve, "pretrain_loss", "loss")


def _saved_run(client: MlflowClient, record: Path):
    try:
        return client.get_run(json.loads(record.read_text())["run_id"])
    except (OSError, ValueError, KeyError, MlflowException):
        return None


def evaluation_run(params_path: str | Path, checkpoint_md5: str) -> tuple[mlflow.ActiveRun, str | None]:
    """The run evaluate logs into, and the id of the run that trained the checkpoint.

    The run of this pipeline run that trained the checkpoint (train's, or scst's where
    self-critical training wrote it), else a run of its own linked to the run that did (`_linked_run`).
    """
    client = MlflowClient()
    found = _runs_tagged(client, SCST_MD5, checkpoint_md5) or _runs_tagged(client, CHECKPOINT_MD5, checkpoint_md5)
    own, trained = _made_by(found, ("train", "scst"))
    if own is not None:
        return mlflow.start_run(run_id=own.info.run_id), own.info.run_id
    run = _linked_run(client, params_path, "evaluate", trained, {CHECKPOINT_MD5: checkpoint_md5})
    return run, trained.info.run_id if trained is not None else None


def scst_run(params_path: str | Path, ce_md5: str, record: Path, resuming: bool,
             epochs: int) -> tuple[mlflow.ActiveRun, ScstLogs]:
    """The run self-critical training logs into, and its callbacks: the run that trained the
    cross-entropy checkpoint (md5 `ce_md5`) when this pipeline run did, else a run of its own
    linked to it. As in `training_run`, a resumed try continues the run `record` names."""
    client = MlflowClient()
    earlier = _saved_run(client, record) if resuming else None
    if earlier is not None:
        run = mlflow.start_run(run_id=earlier.info.run_id, log_system_metrics=True)
        mlflow.set_tags({PIPELINE_RUN: lineage.pipeline_run(), "captioning.resumed": "yes"})
        last = {key: max((m.step for m in client.get_metric_history(run.info.run_id, key)), default=-1)
                for key in ("scst_loss", "scst_val_loss")}
        return run, ScstLogs(run.info.run_id, epochs, last["scst_loss"], last["scst_val_loss"])
    own, trained = _made_by(_runs_tagged(client, CHECKPOINT_MD5, ce_md5), ("train",))
    if own is not None:
        run = mlflow.start_run(run_id=own.info.run_id, log_system_metrics=True)
    else:
        run = _linked_run(client, params_path, "scst", trained, {}, system_metrics=True)
    write_json_atomic(record, {"run_id": run.info.run_id})
    return run, ScstLogs(run.info.run_id, epochs)


def _runs_tagged(client: MlflowClient, tag: str, md5: str) -> list:
    return client.search_runs([experiment_id()], filter_string=f"tags.`{tag}` = '{md5}'",
                              order_by=["attributes.start_time DESC"], max_results=50)


def _made_by(found: list, stages: tuple[str, ...]):
    """(the run of this pipeline run among `found` whose stage is one of `stages`, the newest such run)."""
    made = [r for r in found if r.data.tags.get("stage") in stages]
    here = lineage.pipeline_run()
    return next((r for r in made if r.data.tags.get(PIPELINE_RUN) == here), None), next(iter(made), None)


def _linked_run(client: MlflowClient, params_path: str | Path, stage: str, trained, tags: dict[str, str],
                system_metrics: bool = False) -> mlflow.ActiveRun:
    """A new run for `stage`, whose checkpoint was trained in an earlier run (`trained`, None when
    the store lacks it): tagged `captioning.train_run_id`, it starts with a copy of that run's
    curves and validation metrics, so one run holds the whole experiment and no earlier run's
    params or metrics ever change."""
    if trained is not None:
        note = (f". {stage.capitalize()} only: the checkpoint was trained in run {trained.info.run_name} "
                f"({trained.info.run_id}); its curves are copied here.")
        tags = {**tags, TRAIN_RUN: trained.info.run_id, "captioning.train_run_name": trained.info.run_name}
    else:
        note = f". {stage.capitalize()} only: the run that trained the checkpoint is not in {store_label()}."
    run = start_pipeline_run(params_path, stage, tags=tags, note=note, system_metrics=system_metrics)
    if trained is not None:
        # The training run's own test scores are of its own evaluation, not this one; its system
        # metrics and stage times are of its own pipeline run; and a new self-critical training
        # replaces any that logged there.
        own = ("test_", *_OWN_METRICS, *(("scst_",) if stage == "scst" else ()))
        _copy_metrics(client, trained.info.run_id, run.info.run_id,
                      [k for k in trained.data.metrics if not k.startswith(own)])
    return run


def _copy_metrics(client: MlflowClient, source: str, target: str, keys) -> None:
    logger = MetricLogger(target, client)
    for key in keys:
        for point in client.get_metric_history(source, key):
            logger.buffer.append(Metric(key, point.value, point.timestamp, point.step))
    logger.flush(final=True)


def log_evaluation(params_path: str | Path, data: str | Path, scores: dict[str, float],
                   gallery: Callable[[dict], str], captions: str | Path, trained_in: str | None) -> None:
    """The test scores as `test_*` metrics, the splits (all three unless `trained_in` is this run,
    whose training logged train and val), the gallery (`gallery(about)` names the run and what
    it changed) and the captions file, in the active run."""
    run = mlflow.active_run()
    mlflow.log_metrics({f"test_{k}": v for k, v in scores.items()})
    log_datasets({split: (str(Path(data) / split), context) for split, context in CONTEXTS.items()
                  if split == "test" or trained_in != run.info.run_id})
    with tempfile.TemporaryDirectory() as tmp:
        # At the artifact root, where MLflow's compare view looks; this copy names its run.
        about = {"run": f"{run.info.run_name} ({run.info.run_id})", "experiment": EXPERIMENT,
                 "params": describe_changes(changed_params(params_path))}
        (Path(tmp) / "gallery.html").write_text(gallery(about))
        mlflow.log_artifact(str(Path(tmp) / "gallery.html"))
    mlflow.log_artifact(str(captions))


def add_note(run: mlflow.entities.Run, text: str) -> None:
    """Append `text` to the run's description (the note the MLflow UI shows on its page)."""
    mlflow.set_tag("mlflow.note.content", f"{run.data.tags.get('mlflow.note.content', '')}\n\n{text}")


# MLflow's dataset context of each split, as its UI shows them.
CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def log_datasets(splits: dict[str, tuple[str, str]]) -> None:
    """Record the active run's inputs: each split as a dataset, `{split: (its DVC output path,
    context)}`, its digest the md5 `dvc.lock` holds for it, its source the download stage's params
    in `dvc.lock`. Splits `dvc.lock` does not hold yet (a stage run by hand) are left out."""
    md5s, made_by = lineage.locked_md5s(), lineage.locked_params("download")
    source_name = made_by.get("data", {}).get("source", "unknown")
    source = CodeDatasetSource(tags={"dvc.stage": "download", **flat_text(made_by)})
    for split, (path, context) in splits.items():
        if path in md5s:
            dataset = MetaDataset(source, name=f"{source_name} {split}", digest=md5s[path])
            mlflow.log_input(dataset, context=context)


def log_stage_times(times: dict[str, float | None], logged: dict[str, str] | None = None) -> None:
    """Each stage's time in this pipeline run into the active run: a tag `stage.<name>` ("ran,
    12.3 s" or "cached") for every stage, and a metric `stage_seconds/<name>` for those that ran.
    Stages the run already holds (`logged`, its tags) are not logged twice."""
    logged = logged or {}
    tags, seconds = {}, {}
    for stage, value in times.items():
        if f"stage.{stage}" in logged:
            continue
        tags[f"stage.{stage}"] = "cached" if value is None else f"ran, {value:.1f} s"
        if value is not None:
            seconds[f"stage_seconds/{stage}"] = round(value, 1)
    mlflow.set_tags(tags)
    if seconds:
        mlflow.log_metrics(seconds)


def log_curve(run_id: str, path: str | Path, key: str, column: str) -> None:
    """A DVC plot file (CSV with a `step` column) as the metric `key`, one point per row."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    logger = MetricLogger(run_id)
    for row in rows:
        logger.log({key: float(row[column])}, int(row["step"]))
    logger.flush(final=True)


def write_run_info(path: str | Path, run: mlflow.ActiveRun, **extra) -> None:
    """The one DVC output that names MLflow runs: differs from box to box, and says where the
    runs live ("local", or the server) but never a path or a credential."""
    write_json_atomic(path, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                             "run_name": run.info.run_name, "tracking": store_label(), **extra})


class MetricLogger:
    """Buffers metric points and sends them in batches: one SQLite write per point is slow.

    A store that stops answering in the middle of a run does not stop the run: the points stay
    buffered and go out with a later flush. Only the final flush must get through (after MLflow's
    own retries), or it stops the stage in one line.
    """

    def __init__(self, run_id: str, client: MlflowClient | None = None):
        self.run_id, self.client, self.buffer = run_id, client or MlflowClient(), []
        self.failing = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.buffer) >= _FLUSH_EVERY:
            self.flush()

    def flush(self, final: bool = False) -> None:
        try:
            with _quick() if not final else _nothing():
                while self.buffer:
                    self.client.log_batch(self.run_id, metrics=self.buffer[:1000])  # at most 1000 a call
                    self.buffer = self.buffer[1000:]
        except _ERRORS as err:
            if final:
                raise TrackingError(explain(err, f"{len(self.buffer)} metric points of run {self.run_id} "
                                                 "could not be sent")) from None
            if not self.failing:
                print(f"tracking: {explain(err)}; keeping the metrics and sending them later", flush=True)
            self.failing = True
            return
        if self.failing:
            print("tracking: the store answers again; buffered metrics sent", flush=True)
            self.failing = False


@contextmanager
def _nothing():
    yield


class TrainingLogs:
    """Training callbacks (`training.Callbacks`) of rank 0: print each logged step like the seed, and send steps (loss,
    perplexity) and epochs (validation scores) to the run, buffered.

    A resumed training continues its run (`training_run`), which holds points up to
    `logged_step` / `logged_epoch` already: those are not sent again, and `catch_up` sends what an
    earlier try trained but never sent, so the run holds every point once.
    """

    STEP, EPOCH, TAG = "train_", "", CHECKPOINT_MD5  # step metrics' prefix, epoch metrics' prefix, checkpoint tag

    def __init__(self, run_id: str, epochs: int, logged_step: int = 0, logged_epoch: int = 0):
        self.mlflow, self.epochs = MetricLogger(run_id), epochs
        self.logged_step, self.logged_epoch = logged_step, logged_epoch
        self.sent_steps, self.sent_epochs = set(), set()

    def on_step(self, row: dict) -> None:
        print(f"Epoch [{row['epoch']}/{self.epochs}], Step [{row['batch']}/{row['batches']}], "
              f"Loss: {row['loss']:.4f}, Perplexity: {row['perplexity']:5.4f}", flush=True)
        self._step(row)

    def on_epoch(self, row: dict) -> None:
        scores = _scores(row)
        print(f"{self.EPOCH}epoch {row['epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
        self._epoch(row)
        self.mlflow.flush()

    def catch_up(self, steps: list[dict], history: list[dict]) -> None:
        for row in steps:
            self._step(row)
        for row in history:
            self._epoch(row)

    def finish(self, result, checkpoint: str | Path, kept: Path) -> None:
        """Send what is left of `result` (a `training.FitResult`), then the run's summary and the
        checkpoint's md5 (how evaluate finds this run). A store still down stops here in one line
        naming the `kept` training."""
        self.catch_up(result.step_rows, result.history)
        try:
            self.mlflow.flush(final=True)
        except TrackingError as err:
            raise TrackingError(f"{err}. The training is kept ({kept}): run the stage again once the "
                                "store answers, and it logs the run without training again") from None
        # Wall time goes to MLflow only: in the DVC metrics file it would differ run to run.
        # The checkpoint is logged once, inside the model evaluate logs with its decoding.
        mlflow.log_metrics({f"{self.EPOCH}best_epoch": result.best_epoch, f"{self.STEP}seconds": result.seconds})
        if self.wrote(result):
            mlflow.set_tag(self.TAG, file_digest(checkpoint, "md5"))

    def wrote(self, result) -> bool:
        """Whether the checkpoint is this training's own (how evaluate finds the run)."""
        return True

    def _step(self, row: dict) -> None:
        if row["step"] > self.logged_step and row["step"] not in self.sent_steps:
            self.sent_steps.add(row["step"])
            self.mlflow.log({self.STEP + k: v for k, v in row.items() if k not in _POSITION}, row["step"])

    def _epoch(self, row: dict) -> None:
        if row["epoch"] > self.logged_epoch and row["epoch"] not in self.sent_epochs:
            self.sent_epochs.add(row["epoch"])
            self.mlflow.log({self.EPOCH + val_key(k): v for k, v in _scores(row).items()}, row["epoch"])


class ScstLogs(TrainingLogs):
    """`TrainingLogs` of self-critical training: steps as scst_loss, scst_reward, scst_baseline,
    scst_advantage (and its sd); epochs as scst_val_*, from epoch 0, the cross-entropy model."""

    STEP, EPOCH, TAG = "scst_", "scst_", SCST_MD5

    def __init__(self, run_id: str, epochs: int, logged_step: int = 0, logged_epoch: int = -1):
        super().__init__(run_id, epochs, logged_step, logged_epoch)

    def on_step(self, row: dict) -> None:
        print(f"scst epoch [{row['epoch']}/{self.epochs}], step [{row['batch']}/{row['batches']}]: "
              + ", ".join(f"{k} {row[k]:.4f}" for k in row if k not in _POSITION), flush=True)
        self._step(row)

    def wrote(self, result) -> bool:
        return result.best_epoch > 0  # epoch 0 kept: the checkpoint is train's, as it was


_POSITION = ("step", "epoch", "batch", "batches")  # where a step row is, beside what it measured


def _scores(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("epoch", "best_epoch", "train_loss")}  # train_loss: per step
