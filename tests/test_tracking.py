"""The record's small parts, fast: where a run record says it lives, the champion rule of the
model registry (on a real SQLite store), the torchrun command for several boxes, and what the
lineage reads back from a pipeline run's files."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from mlflow.tracking import MlflowClient

from captioning import accel, lineage, registry
from captioning.errors import UserError
from captioning.tracking import store_label
from conftest import REPO, venv_env


@pytest.mark.parametrize("uri, label", [
    ("sqlite:////home/me/repo/mlflow.db", "local"),
    ("file:///home/me/mlruns", "local"),
    ("http://alice:s3cret@mlflow.team.lan:5000/", "http://mlflow.team.lan:5000"),
    ("https://mlflow.example.com/tracking?token=abc#x", "https://mlflow.example.com/tracking"),
    ("postgresql+psycopg2://mlflow:pw@db:5432/mlflow", "postgresql+psycopg2://db:5432/mlflow"),
])
def test_a_run_record_names_the_server_never_a_path_or_a_credential(uri, label):
    assert store_label(uri) == label


@pytest.fixture
def client(tmp_path):
    return MlflowClient(f"sqlite:///{tmp_path / 'registry.db'}")


def _version(client: MlflowClient, name: str, **scores) -> object:
    try:
        client.create_registered_model(name, tags={registry.KIND_TAG: registry.KIND})
    except Exception:  # noqa: BLE001 - exists already
        pass
    return client.create_model_version(name, "file:///nowhere", tags={k: str(v) for k, v in scores.items()})


def test_the_champion_moves_only_to_a_version_better_on_validation(client):
    first = _version(client, "captioner", val_loss=2.0, val_cider=0.5)
    assert registry.promote(client, "captioner", first, "val_loss").endswith("@champion -> v1")
    worse = _version(client, "captioner", val_loss=2.5, val_cider=0.9)
    said = registry.promote(client, "captioner", worse, "val_loss")
    assert "v2 (val_loss 2.5000) does not beat v1 (val_loss 2.0000)" in said and said.endswith("stays on v1")
    better = _version(client, "captioner", val_loss=1.5, val_cider=0.1)
    assert registry.promote(client, "captioner", better, "val_loss").endswith("beats v1 (val_loss 2.0000): @champion -> v3")
    assert str(client.get_model_version_by_alias("captioner", "champion").version) == "3"
    # Higher is better for a score; `last` picks no epoch by a score, so versions compare on val_loss.
    assert registry.selection_metric("cider") == ("val_cider", False)
    assert registry.selection_metric("last") == ("val_loss", True)
    assert "does not beat v3 (val_cider 0.1000)" not in registry.promote(client, "captioner", worse, "cider")


def test_with_its_version_deleted_the_champion_is_the_best_left(client):
    for loss in (2.0, 1.0, 3.0):
        registry.promote(client, "captioner", _version(client, "captioner", val_loss=loss), "val_loss")
    assert str(client.get_model_version_by_alias("captioner", "champion").version) == "2"
    client.delete_model_version("captioner", "2")  # removes its alias
    newer = _version(client, "captioner", val_loss=2.5)
    said = registry.promote(client, "captioner", newer, "val_loss")
    assert "no @champion: compared with the best other version" in said and said.endswith("@champion -> v1")
    assert str(client.get_model_version_by_alias("captioner", "champion").version) == "1"


def test_a_registered_model_of_another_kind_is_refused(client):
    client.create_registered_model("captioner")  # someone else's, without our tag
    with pytest.raises(registry.RegistryError, match=r"evaluate\.registered_model: .*'captioner' that holds another"):
        registry.check_name(client, "captioner", "local")
    registry.check_name(client, "unused-name", "local")  # free: fine


def test_several_boxes_train_through_a_c10d_rendezvous(monkeypatch):
    monkeypatch.delenv(accel.RDZV_ENDPOINT, raising=False)
    monkeypatch.delenv(accel.NODE_RANK, raising=False)
    assert "--standalone" in accel.torchrun_command(2, 1, ["stages/train.py"])
    with pytest.raises(UserError, match=r"train\.nodes is 2: set CAPTIONING_RDZV_ENDPOINT=HOST:PORT on every box"):
        accel.torchrun_command(1, 2, ["stages/train.py"])
    monkeypatch.setenv(accel.RDZV_ENDPOINT, "box-a.lan:29400")
    command = accel.torchrun_command(1, 2, ["stages/train.py", "--data", "d"])
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=box-a.lan:29400", "--rdzv-conf=is_host=true"} \
        <= set(command) and command[-3:] == ["stages/train.py", "--data", "d"]
    monkeypatch.setenv(accel.NODE_RANK, "1")
    assert "--rdzv-conf=is_host=false" in accel.torchrun_command(1, 2, ["stages/train.py"])
    monkeypatch.setenv(accel.NODE_RANK, "2")
    with pytest.raises(UserError, match=r"CAPTIONING_NODE_RANK=2, but train\.nodes is 2: number the boxes 0 to 1"):
        accel.torchrun_command(1, 2, ["stages/train.py"])
    # Under torchrun, ranks count node by node in CAPTIONING_NODE_RANK order, whatever c10d chose.
    monkeypatch.setenv(accel.NODE_RANK, "1")
    for key, value in {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4", "RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    assert accel.world() == accel.World(rank=3, size=4, local_rank=1)


def test_a_joining_box_numbered_past_train_nodes_stops_in_one_line():
    """scripts/join-training.sh runs dvc.yaml's train command; params.yaml's train.nodes is 1."""
    done = subprocess.run(["bash", str(REPO / "scripts" / "join-training.sh")], capture_output=True, text=True,
                          env=dict(venv_env(), CAPTIONING_NODE_RANK="1", CAPTIONING_RDZV_ENDPOINT="127.0.0.1:1"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "join-training: node 1 -> 127.0.0.1:1: python stages/train.py --data data/resized" in done.stdout
    assert done.stderr.strip() == ("train: CAPTIONING_NODE_RANK=1, but train.nodes is 1: number the boxes 0 to 0, "
                                   "with the same params.yaml on each")


def test_the_lineage_reads_the_pipeline_run_back(tmp_path, monkeypatch):
    assert lineage._is_dvc(["/venv/bin/python", "/venv/bin/dvc", "repro"])
    assert lineage._is_dvc(["dvc", "exp", "run"]) and lineage._is_dvc(["python3", "-m", "dvc", "queue", "start"])
    assert not lineage._is_dvc(["python", "stages/train.py", "--dvc", "x"])
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {s: {"cmd": "true"} for s in ("a", "b", "c")}}))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "a": {"outs": [{"path": "data/x", "md5": "1234.dir"}], "params": {"params.yaml": {"seed": 7}}}}}))
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "a")
    lineage.record_stage(3.21)  # run by DVC in this pipeline run
    stale = {"pipeline_run": "1-1", "seconds": 9.0}  # another pipeline run's
    (tmp_path / "tmp" / "stages" / "b.json").write_text(json.dumps(stale))
    assert lineage.stage_times() == {"a": 3.2, "b": None, "c": None}
    assert lineage.stage_times(before="b") == {"a": 3.2}
    assert lineage.locked_md5s() == {"data/x": "1234.dir"} and lineage.locked_params("a") == {"seed": 7}
    monkeypatch.delenv("DVC_STAGE")
    os.remove(tmp_path / "tmp" / "stages" / "a.json")
    lineage.record_stage(1.0)  # by hand: nothing recorded
    assert not (tmp_path / "tmp" / "stages" / "a.json").exists()
