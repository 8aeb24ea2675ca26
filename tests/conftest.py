"""Fixtures: tiny real datasets generated on the fly (no files checked in, nothing mocked)."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from captioning.params import DataParams
from captioning.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    # No test may write to the developer's own store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic dataset in the pipeline's layout: 48 train, 12 val, 12 test images."""
    out = tmp_path_factory.mktemp("data") / "raw"
    params = dataclasses.replace(DataParams(), num_train=48, num_val=12, num_test=12, workers=1)
    write_dataset(out, params, seed=7)
    return out


class Recorder:
    """`training.Callbacks` that keep every row; `stop_at` a step interrupts there, as a kill would."""

    def __init__(self, stop_at: int | None = None):
        self.steps, self.epochs, self.stop_at = [], [], stop_at

    def on_step(self, row):
        self.steps.append(row)
        if row["step"] == self.stop_at:
            raise KeyboardInterrupt  # as if the process were killed here

    def on_epoch(self, row):
        self.epochs.append(row)


def venv_env() -> dict[str, str]:
    """The environment for subprocesses: this interpreter's bin dir first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env
