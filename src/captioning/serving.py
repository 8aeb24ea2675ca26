"""The captioner as an MLflow pyfunc model: images in, captions out.

Input: a DataFrame with an `image` column of base64-encoded image files (any format and mode
Pillow reads), which is what `mlflow models serve` receives as JSON. Output: a DataFrame with a
`caption` column, one row per image. The model is the checkpoint file and nothing else; it
decodes with the beam size and length penalty of the checkpoint's `evaluate` params.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import mlflow
import pandas as pd
import torch

from captioning.checkpoint import load_checkpoint
from captioning.images import EvalTransform, load_rgb
from captioning.predict import decoding_params, pick_device


def encode_image(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


class CaptionerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model, self.vocab, trained_params = load_checkpoint(context.artifacts["checkpoint"])
        self.beam_size, self.length_penalty = decoding_params(trained_params)
        self.device = pick_device("auto")
        self.model.to(self.device)
        self.transform = EvalTransform(self.model.config["image_size"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = [self.transform(load_rgb(io.BytesIO(base64.b64decode(b)))) for b in model_input["image"]]
        if not images:
            return pd.DataFrame({"caption": []})
        with torch.no_grad():
            ids = self.model.generate(torch.stack(images).to(self.device), self.vocab.end_id,
                                      self.beam_size, self.length_penalty).cpu()
        return pd.DataFrame({"caption": [self.vocab.decode(row) for row in ids.tolist()]})


def log_pyfunc(checkpoint: str | Path, example_image: str | Path, name: str = "model"):
    """Log the checkpoint as a pyfunc model in the active run; returns the model info."""
    package = Path(__file__).resolve().parent
    example = pd.DataFrame({"image": [encode_image(example_image)]})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=CaptionerModel(),
        artifacts={"checkpoint": str(checkpoint)},
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

