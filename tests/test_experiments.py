"""The daily loop of a DVC + MLflow user, for real: a queued sweep run by two parallel workers,
the run-cache, plots, and `mlflow models serve` from the repo's own store (a team's server, the
registry and a DVC remote on S3: test_team.py)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from servers import free_port, wait_http
from pipeline_repo import TINY, make_clone, shell

pytestmark = pytest.mark.slow


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A clone whose default pipeline has run and been committed."""
    clone, env = make_clone(tmp_path_factory.mktemp("exp"), TINY)
    shell(["dvc", "repro"], clone, env)
    shell(["git", "add", "-A"], clone, env)
    shell(["git", "commit", "-q", "-m", "pipeline run"], clone, env)
    return clone, env


def _client(clone: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    return client, client.get_experiment_by_name("captioning").experiment_id


def test_queued_sweep_with_two_workers_lands_in_the_repo_store(project):
    clone, env = project
    client, exp_id = _client(clone)
    before = {r.info.run_id for r in client.search_runs([exp_id])}
    shell(["dvc", "exp", "run", "--queue", "-S", "train.lr=0.003,0.0005"], clone, env)
    shell(["dvc", "queue", "start", "-j", "2"], clone, env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = shell(["dvc", "queue", "status"], clone, env)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    runs = [r for r in client.search_runs([exp_id]) if r.info.run_id not in before]
    assert sorted(r.data.params["train.lr"] for r in runs) == ["0.0005", "0.003"]
    names = {e["name"] for rev in json.loads(shell(["dvc", "exp", "show", "--json"], clone, env))
             for e in (rev.get("experiments") or [])}
    for run in runs:
        assert run.info.run_name in names  # named after its DVC experiment
        assert "test_cider" in run.data.metrics
        # The artifacts live under the repo, not in DVC's deleted temporary copy.
        assert run.info.artifact_uri.startswith((clone / "mlartifacts").as_uri())
        [model] = client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run.info.run_id}'")
        assert model.artifact_location.startswith((clone / "mlartifacts").as_uri())
        assert (Path(model.artifact_location.removeprefix("file://")) / "artifacts" / "checkpoint.pt").is_file()
    assert not any((clone / ".dvc" / "tmp" / "exps").glob("tmp*/mlflow.db"))
    a, b = sorted(r.info.run_name for r in runs)
    diff = json.loads(shell(["dvc", "plots", "diff", a, b, "--json"], clone, env))
    text = json.dumps(diff)
    assert a in text and b in text and "train_loss.csv" in text


def test_run_cache_restores_without_a_new_run(project):
    clone, env = project
    client, exp_id = _client(clone)
    shell(["dvc", "exp", "run", "-S", "train.lr=0.0007"], clone, env)
    count = len(client.search_runs([exp_id]))
    out = shell(["dvc", "exp", "run", "-S", "train.lr=0.0007"], clone, env)
    assert "Running stage 'train'" not in out  # restored from DVC's run-cache
    assert len(client.search_runs([exp_id])) == count
    run_id = json.loads((clone / "reports" / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).data.params["train.lr"] == "0.0007"
    diff = json.loads(shell(["dvc", "params", "diff", "--json"], clone, env))
    assert diff["params.yaml"]["train.lr"]["new"] == 0.0007
    metrics = json.loads(shell(["dvc", "metrics", "diff", "--all", "--json"], clone, env))
    assert "metrics/evaluate.json" in metrics
    # `dvc exp run` applied the experiment to the workspace: back to the committed baseline.
    shell(["git", "checkout", "--", "."], clone, env)
    shell(["dvc", "checkout", "--force"], clone, env)
    assert "up to date" in shell(["dvc", "status"], clone, env)


def test_plots_show_the_curves(project, tmp_path):
    """`dvc plots show` renders every curve with its data: no plot dropped for a missing column."""
    clone, env = project
    out = tmp_path / "plots"
    shell(["dvc", "plots", "show", "-o", str(out)], clone, env)
    page = (out / "index.html").read_text()
    for title in ("Training loss per step", "Validation per epoch (greedy captions)",
                  "Scene scores per epoch (synthetic data only)"):
        assert title in page, title
    shown = json.loads(shell(["dvc", "plots", "show", "--json"], clone, env))
    assert not shown.get("errors"), shown["errors"]
    epochs = TINY["train"]["epochs"]
    for name in ("Validation per epoch (greedy captions)", "Scene scores per epoch (synthetic data only)"):
        [plot] = shown["data"][name]
        values = plot["content"]["data"]["values"]
        assert len({row["epoch"] for row in values}) == epochs, name


def test_mlflow_models_serve_captions_posted_images(project):
    clone, env = project
    model_uri = json.loads((clone / "reports" / "mlflow_run.json").read_text())["model_uri"]
    port = free_port()
    serve_env = dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{clone / 'mlflow.db'}")
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=clone, env=serve_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping")
        images = sorted((clone / "data" / "raw" / "test" / "images").glob("*.jpg"))[:2]
        body = {"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(p.read_bytes()).decode()] for p in images]}}
        predictions = _post(f"http://127.0.0.1:{port}/invocations", body)["predictions"]
        assert len(predictions) == 2
        assert all(isinstance(p["caption"], str) and p["caption"] for p in predictions)
    finally:
        server.terminate()
        server.wait(30)
    # The registry's champion, from the repo's own store (no MLFLOW_TRACKING_URI needed).
    out = shell(["caption", "--model", "models:/captioner@champion", str(images[0])], clone, env)
    assert f"{images[0]}\t" in out
