"""Caption images with a trained captioner: batched greedy or beam-search decoding over a DataLoader."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioning import accel
from captioning.data import ImageDataset
from captioning.images import EvalTransform
from captioning.model import Captioner
from captioning.params import EvaluateParams
from captioning.text import Vocabulary


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def decoding_params(trained_params: dict) -> tuple[int, float]:
    """(beam_size, length_penalty) of the `evaluate` section a checkpoint was trained with (its
    `params`), else the defaults: the caption CLI and the MLflow model decode as evaluate did."""
    section = trained_params.get("evaluate") or {}
    return (section.get("beam_size", EvaluateParams.beam_size),
            section.get("length_penalty", EvaluateParams.length_penalty))


@torch.no_grad()
def caption_images(model: Captioner, vocab: Vocabulary, paths: list, device: torch.device,
                   batch_size: int = 64, num_workers: int = 0, progress: bool = True,
                   beam_size: int = 1, length_penalty: float = 0.0, bf16: bool = False) -> list[str]:
    """One caption per image path, in order: greedy for `beam_size` 1, else beam search.

    On CUDA the CNN runs channels_last, and with `bf16` under bf16 autocast (the train stage's
    `train.bf16`); elsewhere both are no-ops, so CPU captions do not depend on them.
    """
    model.eval().to(device)
    accel.channels_last(model.encoder.backbone, device)
    dataset = ImageDataset(paths, EvalTransform(model.config["image_size"]))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    captions: list[str] = [""] * len(dataset)
    for images, index in tqdm(loader, desc="caption", unit="batch", disable=not progress):
        images = accel.channels_last(images.to(device, non_blocking=True), device)
        ids = model.generate(images, vocab.end_id, beam_size, length_penalty, bf16).cpu()
        for row, i in zip(ids.tolist(), index.tolist()):
            captions[i] = vocab.decode(row)
    return captions


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_files(inputs: list[str]) -> list[Path]:
    """Files named, plus the images inside folders named (sorted)."""
    found: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise SystemExit(f"caption: no such file or folder: {path}")
    return found


def main(argv: list[str] | None = None) -> None:
    """`caption IMAGE_OR_FOLDER... --checkpoint models/checkpoint.pt`: one `path<TAB>caption` per line."""
    import argparse

    from captioning.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser(prog="caption", description=main.__doc__)
    parser.add_argument("inputs", nargs="+", help="image files or folders of images (any mode: converted to RGB)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default="models/checkpoint.pt")
    source.add_argument("--model", help="an MLflow model URI instead: runs:/<run id>/model, models:/...")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--beam-size", type=int,
                        help="captions kept per image while decoding, 1 = greedy (default: the checkpoint's "
                             "evaluate.beam_size); length_penalty is the checkpoint's evaluate.length_penalty")
    args = parser.parse_args(argv)
    if args.beam_size is not None and args.beam_size < 1:
        parser.error(f"--beam-size must be >= 1, got {args.beam_size}")
    if args.beam_size is not None and args.model:
        parser.error("--beam-size applies to --checkpoint; an MLflow model decodes as its checkpoint's "
                     "evaluate params say")
    paths = image_files(args.inputs)
    if args.model:
        import mlflow.pyfunc
        import pandas as pd

        from captioning.serving import encode_image

        frame = pd.DataFrame({"image": [encode_image(p) for p in paths]})
        captions = list(mlflow.pyfunc.load_model(args.model).predict(frame)["caption"])
    else:
        model, vocab, trained_params = load_checkpoint(args.checkpoint)
        beam_size, length_penalty = decoding_params(trained_params)
        captions = caption_images(model, vocab, paths, pick_device(args.device), args.batch_size, progress=False,
                                  beam_size=args.beam_size or beam_size, length_penalty=length_penalty)
    for path, caption in zip(paths, captions):
        print(f"{path}\t{caption}")
