"""A team's setup, for real, on loopback: an MLflow tracking server backed by PostgreSQL with its
artifacts proxied to S3 (moto's server), boxes that are clones of one git remote sharing an S3
DVC remote, the model registry and its champion, a training over two nodes, the run page in
headless Chromium, and what a box sees when the server is wrong, down, or goes away mid-run."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, venv_env
from servers import S3_KEYS, MlflowServer, Postgres, Proxy, S3, free_port, wait_http
from pipeline_repo import TINY, histories, make_clone, merge, reset, shell

pytestmark = pytest.mark.slow

STAGES = ("download", "vocab", "resize", "weights", "pretrain", "features", "train", "evaluate")


class Team:
    """The services of a team: PostgreSQL, S3 and the tracking server in front of them."""

    def __init__(self, root: Path):
        self.env = {**venv_env(), **S3_KEYS}
        self.postgres = Postgres()
        self.s3 = S3(self.env)
        self.s3.bucket("mlflow")
        self.s3.bucket("dvc")
        self.server = MlflowServer(self.postgres.uri(), "s3://mlflow/artifacts",
                                   {**self.env, "MLFLOW_S3_ENDPOINT_URL": self.s3.url}, root / "mlflow-server.log")
        self.client = MlflowClient(self.server.url)

    def box(self, where: Path, params: dict = TINY, uri: str | None = None) -> tuple[Path, dict]:
        """A clone whose stages log to the server (or `uri`), as a box of the team is set up."""
        clone, env = make_clone(where, params)
        env.update(S3_KEYS, MLFLOW_TRACKING_URI=uri or self.server.url,
                   MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")  # tiny runs last seconds
        return clone, env

    def runs(self) -> list:
        experiment = self.client.get_experiment_by_name("captioning")
        return self.client.search_runs([experiment.experiment_id]) if experiment else []

    def stop(self) -> None:
        self.server.stop()
        self.s3.stop()
        self.postgres.stop()


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    services = Team(tmp_path_factory.mktemp("team"))
    yield services
    services.stop()


@pytest.fixture(scope="module")
def box_a(team, tmp_path_factory):
    """Box A: the default pipeline run once against the server, and committed."""
    clone, env = team.box(tmp_path_factory.mktemp("box-a"))
    out = shell(["dvc", "repro"], clone, env)
    shell(["git", "add", "-A"], clone, env)
    shell(["git", "commit", "-q", "-m", "pipeline run"], clone, env)
    return clone, env, out


def _lock(clone: Path, rev: str | None = None) -> dict:
    text = (subprocess.run(["git", "show", f"{rev}:dvc.lock"], cwd=clone, capture_output=True, text=True,
                           check=True).stdout if rev else (clone / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for s in yaml.safe_load(text)["stages"].values() for o in s.get("outs", [])}


def _fails(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode != 0, done.stdout[-3000:]
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-4000:]
    return done.stdout + done.stderr


def test_a_pipeline_run_lands_on_the_server_with_its_lineage(team, box_a):
    clone, env, out = box_a
    [run] = team.runs()
    info = json.loads((clone / "reports" / "mlflow_run.json").read_text())
    assert info["run_id"] == run.info.run_id and info["tracking"] == team.server.url
    assert not (clone / "mlflow.db").exists() and not (clone / "mlartifacts").exists()
    metrics = json.loads((clone / "metrics" / "evaluate.json").read_text())
    assert run.data.metrics["test_cider"] == pytest.approx(metrics["cider"])
    assert run.data.params["train.lr"] == str(TINY.get("train", {}).get("lr", 0.004))
    # The artifacts (model, gallery, params) went through the server into the S3 bucket.
    keys = team.s3.keys("mlflow")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/gallery.html") for k in keys)
    assert any(k.endswith(f"{run.info.run_id}/artifacts/params.yaml") for k in keys)
    assert any(k.endswith("artifacts/checkpoint.pt") for k in keys)
    # Lineage: the splits as datasets (digest: their md5 in dvc.lock), system metrics, pretrain's
    # curve and every stage's time.
    lock = _lock(clone)
    datasets = {d.dataset.name: (d.dataset.digest, d.tags[0].value) for d in run.inputs.dataset_inputs}
    assert datasets == {"synthetic train": (lock["data/resized/train"], "training"),
                        "synthetic val": (lock["data/resized/val"], "validation"),
                        "synthetic test": (lock["data/resized/test"], "testing")}
    assert '"data.source": "synthetic"' in run.inputs.dataset_inputs[0].dataset.source
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    pretrain = json.loads((clone / "metrics" / "pretrain.json").read_text())
    assert len(team.client.get_metric_history(run.info.run_id, "pretrain_loss")) == pretrain["pretrain_steps"]
    assert [run.data.tags[f"stage.{s}"].split(",")[0] for s in STAGES] == ["ran"] * len(STAGES)
    assert {f"stage_seconds/{s}" for s in STAGES} <= set(run.data.metrics)
    # The registry: version 1, tagged with where it came from, is the champion.
    version = team.client.get_model_version_by_alias("captioner", "champion")
    assert version.version == "1" and version.run_id == run.info.run_id
    assert info["model_uri"] == "models:/captioner/1"
    assert version.tags["dvc.md5.models/checkpoint.pt"] == lock["models/checkpoint.pt"]
    assert version.tags["dvc.md5.data/resized/train"] == lock["data/resized/train"]
    assert version.tags["git.commit"] == run.data.tags["git.commit"] and version.tags["dvc.exp_name"] == "workspace"
    assert "registry: captioner v1" in out and "@champion -> v1" in out


def test_evaluate_only_and_a_queued_sweep_land_there_too(team, box_a):
    clone, env, _ = box_a
    [baseline] = team.runs()
    before = histories(team.client, baseline)
    out = shell(["dvc", "exp", "run", "-n", "beam1", "-S", "evaluate.beam_size=1"], clone, env)
    assert "Running stage 'evaluate'" in out and "Running stage 'train'" not in out
    reset(clone, env)
    # A sweep of two queued experiments: one trains longer at a higher rate (better on val), one
    # barely moves its weights (worse).
    shell(["dvc", "exp", "run", "--queue", "-n", "better", "-S", "train.epochs=6", "-S", "train.lr=0.02"], clone, env)
    shell(["dvc", "exp", "run", "--queue", "-n", "worse", "-S", "train.lr=0.000001"], clone, env)
    shell(["dvc", "queue", "start", "-j", "1"], clone, env)
    deadline = time.monotonic() + 600
    while (status := shell(["dvc", "queue", "status"], clone, env)).count("Success") < 2:
        assert "Failed" not in status and time.monotonic() < deadline, status
        time.sleep(3)
    runs = {r.info.run_name: r for r in team.runs()}
    assert sorted(runs) == sorted([baseline.info.run_name, "beam1", "better", "worse"])
    assert histories(team.client, runs[baseline.info.run_name]) == before  # earlier runs untouched
    for name, lr in (("better", "0.02"), ("worse", "1e-06")):
        assert runs[name].data.params["train.lr"] == lr and "test_cider" in runs[name].data.metrics
    beam1 = runs["beam1"]
    assert beam1.data.tags["captioning.train_run_id"] == baseline.info.run_id
    assert beam1.data.tags["stage.train"] == "cached" and beam1.data.tags["stage.evaluate"].startswith("ran")
    assert not any(k.startswith("system/") for k in beam1.data.metrics)  # not its own: not copied
    assert not list(clone.glob("mlflow.db")) and not list(clone.glob(".dvc/tmp/exps/**/mlflow.db"))
    # The champion moved to the better experiment's version only, compared on val_loss (train.select_metric).
    versions = {v.tags["captioning.run_name"]: v for v in team.client.search_model_versions("name = 'captioner'")}
    assert sorted(versions) == sorted(runs)
    val = {name: float(v.tags["val_loss"]) for name, v in versions.items()}
    assert val["better"] < val[baseline.info.run_name] < val["worse"]
    assert team.client.get_model_version_by_alias("captioner", "champion").version == versions["better"].version
    checks = {name: v.tags["captioning.champion_check"] for name, v in versions.items()}
    assert "beats v1 (val_loss" in checks["better"] and "@champion ->" in checks["better"]
    assert "does not beat" in checks["worse"] and "@champion stays on" in checks["worse"]


def test_the_champion_is_served_by_alias(team, box_a):
    clone, env, _ = box_a
    port = free_port()
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/captioner@champion", "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)],
                              cwd=clone, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL)
    images = sorted((clone / "data" / "raw" / "test" / "images").glob("*.jpg"))[:2]
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", process=server)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p.read_bytes()).decode()]
                                                                   for p in images]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
        assert len(predictions) == 2 and all(p["caption"] for p in predictions)
    finally:
        server.terminate()
        server.wait(30)
    out = shell(["caption", "--model", "models:/captioner@champion", str(images[0])], clone, env)
    assert f"{images[0]}\t" in out


def test_an_experiment_moves_between_boxes(team, box_a, tmp_path):
    clone_a, env, _ = box_a
    origin = tmp_path / "origin.git"
    shell(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path, env)
    shell(["git", "remote", "add", "origin", str(origin)], clone_a, env)
    shell(["dvc", "remote", "add", "-d", "store", "s3://dvc/store"], clone_a, env)
    shell(["dvc", "remote", "modify", "store", "endpointurl", team.s3.url], clone_a, env)
    shell(["git", "commit", "-q", "-am", "the team's DVC remote"], clone_a, env)
    shell(["git", "push", "-q", "origin", "main"], clone_a, env)
    shell(["dvc", "exp", "run", "-n", "lr-half", "-S", "train.lr=0.002"], clone_a, env)
    shell(["dvc", "exp", "push", "origin", "lr-half"], clone_a, env)
    shell(["dvc", "push"], clone_a, env)

    clone_b = tmp_path / "box-b"
    shell(["git", "clone", "-q", str(origin), str(clone_b)], tmp_path, env)
    env_b = dict(env, PYTHONPATH=str(clone_b / "src"))
    shell(["dvc", "exp", "pull", "origin", "lr-half"], clone_b, env_b)
    shell(["dvc", "exp", "apply", "lr-half"], clone_b, env_b)
    shell(["dvc", "pull"], clone_b, env_b)
    assert "up to date" in shell(["dvc", "status"], clone_b, env_b)
    lock = _lock(clone_a)
    assert _lock(clone_b) == lock
    for path in lock:
        for file in ([clone_a / path] if (clone_a / path).is_file() else sorted((clone_a / path).rglob("*"))):
            if file.is_file():
                assert (clone_b / file.relative_to(clone_a)).read_bytes() == file.read_bytes(), file
    info = json.loads((clone_b / "reports" / "mlflow_run.json").read_text())
    run = team.client.get_run(info["run_id"])  # box A's run, on the shared server
    assert run.info.run_name == "lr-half" and run.data.params["train.lr"] == "0.002"
    reset(clone_a, env)


def test_the_run_page_shows_the_lineage_in_a_browser(team, box_a, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it"
    clone, _, _ = box_a
    info = json.loads((clone / "reports" / "mlflow_run.json").read_text())
    page = f"{team.server.url}/#/experiments/{info['experiment_id']}/runs/{info['run_id']}"

    def text(url: str) -> str:
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
                              "--virtual-time-budget=30000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120).stdout
        return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))

    overview = text(page)
    train_md5 = _lock(clone, "HEAD")["data/resized/train"]
    # The run's datasets (the first shown, "+2" for val and test), tags, params and metrics.
    assert f"Datasets synthetic train ({train_md5}) training +2" in overview
    for shown in ("stage.pretrain : ran, ", "stage.evaluate : ran, ", "train.lr", "pretrain_loss",
                  "stage_seconds/pretrain", "val_loss", "test_cider", "Registered models captioner v1"):
        assert shown in overview, shown
    system = text(f"{page}/system-metrics")
    charts = re.search(r"System metrics \((\d+)\)", system)
    assert charts and int(charts.group(1)) >= 4 and "cpu_utilization_percentage" in system, system[:2000]


def test_a_wrong_or_unready_store_stops_the_stage_in_one_line(team, box_a, tmp_path):
    clone, env, _ = box_a
    # Nothing listens there: train stops before any training, naming the variable.
    down = f"http://127.0.0.1:{free_port()}"
    out = _fails(["dvc", "repro", "-s", "-f", "train"], clone, dict(env, MLFLOW_TRACKING_URI=down))
    assert f"train: MLFLOW_TRACKING_URI={down}: no MLflow server answers there" in out and "Epoch [" not in out
    # Something answers, but not MLflow (the S3 server).
    out = _fails(["dvc", "repro", "-s", "-f", "evaluate"], clone, dict(env, MLFLOW_TRACKING_URI=team.s3.url))
    assert f"evaluate: MLFLOW_TRACKING_URI={team.s3.url}: something answers there, but not an MLflow" in out
    # A server whose S3 credentials are missing: the run's first artifact fails, before training.
    bare = {k: v for k, v in team.env.items() if not k.startswith("AWS_")}
    no_keys = MlflowServer(team.postgres.create("nokeys"), "s3://mlflow/nokeys",
                           dict(bare, MLFLOW_S3_ENDPOINT_URL=team.s3.url, AWS_EC2_METADATA_DISABLED="true"),
                           tmp_path / "nokeys.log")
    try:
        out = _fails(["dvc", "repro", "-s", "-f", "train"], clone, dict(env, MLFLOW_TRACKING_URI=no_keys.url))
    finally:
        no_keys.stop()
    assert "storing the run's artifacts: the artifact store refused (S3 credentials or bucket)" in out, out
    assert "Epoch [" not in out
    # A registered model of that name that holds another kind of model.
    team.client.create_registered_model("someone-elses")
    out = _fails(["dvc", "exp", "run", "-S", "evaluate.registered_model=someone-elses"], clone, env)
    assert "evaluate: evaluate.registered_model: " in out and "'someone-elses' that holds another kind" in out
    reset(clone, env)
    # The champion's version deleted (which removes its alias): serving it says so in one line,
    # and the next version is compared with the best one left.
    shell(["dvc", "exp", "run", "-S", "evaluate.registered_model=solo"], clone, env)
    reset(clone, env)
    team.client.delete_model_version("solo", "1")
    out = _fails(["caption", "--model", "models:/solo@champion", str(next((clone / "data" / "raw" / "test"
                                                                              / "images").glob("*.jpg")))], clone, env)
    assert out.strip().count("\n") == 0 and "caption: models:/solo@champion:" in out
    out = shell(["dvc", "exp", "run", "-S", "evaluate.registered_model=solo", "-S", "evaluate.beam_size=1"], clone, env)
    assert "registry: solo v2" in out and "@champion -> v2" in out
    reset(clone, env)


def test_a_server_that_goes_away_mid_run_loses_nothing(team, box_a, tmp_path):
    """The line to the server is cut right after train's first metrics reach it: training goes
    on, buffering, and the stage then stops in one line; once the server answers again, the rerun
    trains nothing more and completes the same run, every point once. This box, at another path,
    ends with every output byte-identical to box A's but the run record."""
    proxy = Proxy(team.server.port, cut_after=b'"train_loss"')
    clone, env = team.box(tmp_path, uri=proxy.url)
    env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0")
    shell(["dvc", "repro", "features"], clone, env)
    out = _fails(["dvc", "repro"], clone, env)
    assert "Epoch [2/2]" in out  # training went on after the cut
    [line] = [li for li in out.splitlines() if li.startswith("train: MLFLOW_TRACKING_URI=")]
    assert "no MLflow server answers there" in line and "The training is kept" in line
    assert "Running stage 'evaluate'" not in out
    proxy.restore()
    out = shell(["dvc", "repro"], clone, env)
    assert "resumed from" in out and "Epoch [" not in out and "Running stage 'evaluate'" in out
    assert "up to date" in shell(["dvc", "status"], clone, env)
    run = team.client.get_run(json.loads((clone / "reports" / "mlflow_run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["captioning.resumed"] == "yes"
    steps = [m.step for m in team.client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == [1, 2]  # every step, once
    assert [m.step for m in team.client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    assert "test_cider" in run.data.metrics
    # The same outputs as box A's, to the byte, but the one file that names the run; no output
    # holds a path of this box.
    a, b = _lock(box_a[0], "HEAD"), _lock(clone)
    assert sorted(a) == sorted(b) and {p for p in a if a[p] != b[p]} == {"reports/mlflow_run.json"}
    for path in b:
        for file in [clone / path] if (clone / path).is_file() else (clone / path).rglob("*"):
            assert not file.is_file() or str(tmp_path).encode() not in file.read_bytes(), file


def test_training_over_two_nodes_matches_one_node_with_two_processes(tiny_data, tmp_path):
    """2 nodes x 1 process (c10d rendezvous on loopback, gloo) ends with the same weights as 1
    node x 2 processes; only node 0's rank 0 logs and writes outputs."""
    work = tmp_path / "node0"
    work.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(image_size=32, embed_size=16, hidden_size=24)
    params["train"].update(epochs=2, batch_size=20, log_every=1)
    params["compute"].update(num_workers=0)
    # torchrun gives each of 2 processes on a box one thread, a single process all of them: the
    # same thread count everywhere makes the kernels sum in the same order.
    env = dict(venv_env(), OMP_NUM_THREADS="1")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(tiny_data, work / "raw")
    subprocess.run([sys.executable, str(REPO / "stages" / "vocab.py"), "--data", "raw", "--out", "vocab.json"],
                   cwd=work, env=env, check=True, capture_output=True)
    torch.manual_seed(0)
    import torchvision

    torch.save({k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")},
               work / "backbone.pt")
    subprocess.run([sys.executable, str(REPO / "stages" / "features.py"), "--data", "raw", "--backbone",
                    "backbone.pt", "--out", "features"], cwd=work, env=env, check=True, capture_output=True)
    node1 = tmp_path / "node1"
    shutil.copytree(work, node1)

    def train(folder: Path, tag: str, **train_params) -> list[str]:
        (folder / "params.yaml").write_text(yaml.safe_dump(merge(params, {"train": train_params})))
        return [sys.executable, str(REPO / "stages" / "train.py"), "--data", "raw", "--vocab", "vocab.json",
                "--backbone", "backbone.pt", "--features", "features", "--pretrain-curve", "none.csv",
                "--checkpoint", f"{tag}/checkpoint.pt", "--metrics", f"{tag}/train.json", "--plots",
                f"{tag}/plots", "--resume-dir", f"{tag}/resume"]

    one_node = subprocess.run(train(work, "one-node", processes=2), cwd=work, env=env, check=True,
                              capture_output=True, text=True).stdout
    assert "torch.distributed.run" in one_node and "x 2 processes" in one_node
    endpoint = f"127.0.0.1:{free_port()}"
    joiner_env = dict(env, CAPTIONING_NODE_RANK="1", CAPTIONING_RDZV_ENDPOINT=endpoint,
                      MLFLOW_TRACKING_URI=f"sqlite:///{node1 / 'mlflow.db'}")
    joiner = subprocess.Popen(train(node1, "two-nodes", nodes=2), cwd=node1, env=joiner_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    leader = subprocess.run(train(work, "two-nodes", nodes=2), cwd=work, env=dict(env, CAPTIONING_RDZV_ENDPOINT=endpoint),
                            capture_output=True, text=True, timeout=300)
    joined = joiner.communicate(timeout=120)[0]
    assert leader.returncode == 0 and joiner.returncode == 0, leader.stderr[-3000:] + joined[-3000:]
    a = torch.load(work / "one-node" / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(work / "two-nodes" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (node1 / "two-nodes").exists() and not (node1 / "mlflow.db").exists()  # node 1 writes nothing
    assert "Epoch [" not in joined
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("captioning").experiment_id])
    assert sorted(r.data.params["train.nodes"] for r in runs) == ["1", "2"]
