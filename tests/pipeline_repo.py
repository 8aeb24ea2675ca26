"""A temporary git repo holding the project's pipeline, for the end-to-end tests: the real `dvc`
runs in it, on its own copy of the code and a small params.yaml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, venv_env

TINY = {
    "data": {"num_train": 40, "num_val": 8, "num_test": 8, "min_side": 100, "max_side": 160, "workers": 2},
    "resize": {"side": 64, "workers": 2},
    "model": {"image_size": 32, "embed_size": 16, "hidden_size": 24},
    "pretrain": {"epochs": 1, "batch_size": 16},
    "train": {"epochs": 2, "batch_size": 40, "log_every": 1},
    "evaluate": {"gallery_size": 4},
    "compute": {"num_workers": 0},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) else value
    return out


def shell(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def make_clone(tmp_path: Path, params_override: dict) -> tuple[Path, dict]:
    """A git repo holding the project's pipeline, with `params_override` applied and committed."""
    clone = tmp_path / "repo"
    clone.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "stages", "src", "inputs"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, clone / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, clone / name)
    (clone / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", clone / ".dvc" / "config")
    shutil.copy2(REPO / ".dvc" / ".gitignore", clone / ".dvc" / ".gitignore")
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), params_override)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = venv_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: <repo root>/mlflow.db
    env["PYTHONPATH"] = str(clone / "src")  # run the clone's code, which DVC hashes
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com")
    shell(["git", "init", "-q", "-b", "main"], clone, env)
    shell(["git", "add", "-A"], clone, env)
    shell(["git", "commit", "-q", "-m", "baseline"], clone, env)
    return clone, env


def reset(clone: Path, env: dict) -> None:
    """`dvc exp run` leaves its experiment in the workspace: back to the committed baseline."""
    shell(["git", "checkout", "--", "."], clone, env)
    shell(["dvc", "checkout", "--force"], clone, env)


def histories(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            for key in run.data.metrics}
