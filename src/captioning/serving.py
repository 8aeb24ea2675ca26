"""The captioner as an MLflow pyfunc model: images in, captions out.

Input: a DataFrame with an `image` column of base64-encoded image files (any format and mode
Pillow reads), which is what `mlflow models serve` receives as JSON. Output: a DataFrame with a
`caption` column, one row per image. The model is two artifacts: the checkpoint (the only copy
of the weights in the run) and the decoding settings the evaluate stage scored with; predict
runs the same batched `caption_images` as the `caption` CLI and the evaluate stage.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import mlflow
import pandas as pd
import torch

from captioning import accel
from captioning.checkpoint import load_checkpoint
from captioning.predict import Decoding, caption_images, encode_image


class CaptionerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model, self.vocab, _ = load_checkpoint(context.artifacts["checkpoint"])
        self.decoding = Decoding.load(context.artifacts["decoding"])
        self.device = accel.pick_device("auto")

    def __getstate__(self) -> dict:
        # MLflow pickles this object into the model folder after it has run load_context (for the
        # input example): without this the pickle would hold a second copy of the weights.
        return {}

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = [io.BytesIO(base64.b64decode(b)) for b in model_input["image"]]
        captions = caption_images(self.model, self.vocab, images, self.device, self.decoding, progress=False)
        return pd.DataFrame({"caption": captions})


def model_name(run_name: str) -> str:
    """A logged model's name after its experiment (MLflow allows letters, digits, '-', '_', '.')."""
    return "captioner-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-") or "run")


def log_pyfunc(checkpoint: str | Path, decoding: str | Path, example_image: str | Path, name: str):
    """Log the checkpoint and its decoding settings as a pyfunc model in the active run."""
    package = Path(__file__).resolve().parent
    example = pd.DataFrame({"image": [encode_image(example_image)]})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=CaptionerModel(),
        artifacts={"checkpoint": str(checkpoint), "decoding": str(decoding)},
        code_paths=[str(package)],  # the model loads without this repo installed
        input_example=example,
        pip_requirements=_requirements(),
    )


def _requirements() -> list[str]:
    """The pinned requirements this model needs at serving time (from requirements.txt when present)."""
    wanted = ("torch", "torchvision", "pillow", "pandas", "mlflow")
    req = Path(__file__).resolve().parents[2] / "requirements.txt"
    if req.is_file():
        pins = [line.strip() for line in req.read_text().splitlines() if "==" in line and not line.startswith("#")]
        return [p for p in pins if p.split("==")[0].lower() in wanted]
    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
