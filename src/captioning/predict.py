"""Caption images with a trained captioner: batched greedy or beam-search decoding over a DataLoader.

How captions are decoded (`Decoding`) is what the evaluate stage used: it records it beside the
checkpoint (`models/decoding.json`) and inside the MLflow model, so the `caption` CLI and the
served model caption exactly as the scored test captions were made.
"""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioning import accel
from captioning.data import ImageDataset
from captioning.images import Transform, load_rgb, scale
from captioning.io import write_json_atomic
from captioning.model import AttentionDecoder, Captioner
from captioning.text import Vocabulary


@dataclass(frozen=True)
class Decoding:
    """How captions are decoded; evaluate makes it from `evaluate.*` and `compute.bf16`."""

    beam_size: int  # captions kept per image while decoding; 1 = greedy
    length_penalty: float  # beam search ranks summed log-prob / length ** length_penalty
    bf16: bool  # the CNN under bf16 autocast on CUDA (no effect elsewhere)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "Decoding":
        return cls(**json.loads(Path(path).read_text()))

    def describe(self) -> str:
        return "greedy" if self.beam_size == 1 else f"beam {self.beam_size}, length penalty {self.length_penalty:g}"


@torch.no_grad()
def caption_images(model: Captioner, vocab: Vocabulary, images: list, device: torch.device,
                   decoding: Decoding, batch_size: int = 64, num_workers: int = 0,
                   progress: bool = True) -> list[str]:
    """One caption per image (a path or a binary file object), in order, decoded as `decoding` says.

    On CUDA the CNN runs channels_last, and with `decoding.bf16` under bf16 autocast; elsewhere
    both are no-ops, so CPU captions do not depend on them.
    """
    model.eval().to(device)
    accel.channels_last(model.encoder.backbone, device)
    dataset = ImageDataset(images, Transform(model.config["image_size"]))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    captions: list[str] = []
    for batch in tqdm(loader, desc="caption", unit="batch", disable=not progress):  # in order: no shuffle
        batch = accel.channels_last(batch.to(device, non_blocking=True), device)
        ids = model.generate(batch, vocab.end_id, beam_size=decoding.beam_size,
                             length_penalty=decoding.length_penalty, bf16=decoding.bf16)
        captions += [vocab.decode(row) for row in ids.cpu().tolist()]
    return captions


@torch.no_grad()
def attention_figures(model: Captioner, vocab: Vocabulary, paths: list[Path], out: Path, device: torch.device,
                      decoding: Decoding, side: int = 160) -> list[Path]:
    """For each image, caption it as `decoding` says and save `<out>/<name>.attention.png`: one
    panel per word of the caption, lit where the attention decoder looked before saying it."""
    from captioning.report import attention_figure

    model.eval().to(device)
    size = model.config["image_size"]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        picture = load_rgb(path)
        image = Transform(size)(picture).unsqueeze(0).to(device)
        ids = model.generate(image, vocab.end_id, beam_size=decoding.beam_size,
                             length_penalty=decoding.length_penalty, bf16=decoding.bf16)
        maps = model.attention_maps(image, ids)[0].cpu().numpy()  # (L, h, w)
        # Step t predicts ids[t]: a panel per word the caption shows (as `Vocabulary.decode` reads
        # the ids), then one for the <end> it stopped at.
        steps = []
        for t, i in enumerate(ids[0].tolist()):
            if i not in (vocab.pad_id, vocab.start_id):
                steps.append((t, vocab.words[i]))
            if i == vocab.end_id:
                break
        crop = Transform(side).crop(scale(picture, side))  # the region the network saw, at `side` px
        figure = attention_figure(Image.fromarray(crop.permute(1, 2, 0).numpy()), [w for _, w in steps],
                                  maps[[t for t, _ in steps]], side)
        target = out / f"{Path(path).stem}.attention.png"
        figure.save(target)
        written.append(target)
    return written


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


def encode_image(path: str | Path) -> str:
    """An image file as the MLflow model takes it: base64 of the file's bytes."""
    return base64.b64encode(Path(path).read_bytes()).decode()


def caption_with_logged_model(uri: str, paths: list[Path]) -> list[str]:
    """Caption with an MLflow model (`runs:/...`, `models:/captioner@champion`, ...) from the
    project's store (`MLFLOW_TRACKING_URI`, else the repo's mlflow.db); a URI the store cannot
    resolve is one line."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from captioning.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        model = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as err:
        reason = " ".join(str(err).split())[:300]
        hint = (" (an alias whose version was deleted is removed with it: see the versions in the MLflow UI's "
                "Models page, or run the pipeline to register one)" if "@" in uri else "")
        raise SystemExit(f"caption: {uri}: {reason}{hint}") from None
    frame = pd.DataFrame({"image": [encode_image(p) for p in paths]})
    return list(model.predict(frame)["caption"])


def caption_with_checkpoint(args, paths: list[Path]) -> list[str]:
    """Caption with `args.checkpoint`, decoding as the evaluate stage recorded (or `args.beam_size`),
    and draw the attention figures `args.attention` asks for."""
    from captioning.checkpoint import CheckpointError, load_checkpoint

    decoding_path = Path(args.decoding or Path(args.checkpoint).with_name("decoding.json"))
    if not decoding_path.is_file():
        raise SystemExit(f"caption: {decoding_path}: no decoding settings; run the evaluate stage "
                         "(dvc repro evaluate), or pass --decoding FILE")
    decoding = Decoding.load(decoding_path)
    if args.beam_size is not None:
        decoding = Decoding(args.beam_size, decoding.length_penalty, decoding.bf16)
    try:
        model, vocab, _ = load_checkpoint(args.checkpoint)
    except CheckpointError as err:
        raise SystemExit(f"caption: {err}") from None
    if args.attention and not isinstance(model.decoder, AttentionDecoder):
        raise SystemExit(f"caption: --attention: {args.checkpoint} was trained with model.decoder: "
                         f"{model.config.get('decoder', 'lstm')}, which has no attention to show; train "
                         "with model.decoder: attention")
    device = accel.pick_device(args.device)
    captions = caption_images(model, vocab, paths, device, decoding, args.batch_size, progress=False)
    if args.attention:
        for figure in attention_figures(model, vocab, paths, Path(args.attention), device, decoding):
            print(f"caption: attention figure -> {figure}", file=sys.stderr)
    return captions


def main(argv: list[str] | None = None) -> None:
    """`caption IMAGE_OR_FOLDER... --checkpoint models/checkpoint.pt`: one `path<TAB>caption` per line."""
    import argparse

    parser = argparse.ArgumentParser(prog="caption", description=main.__doc__)
    parser.add_argument("inputs", nargs="+", help="image files or folders of images (any mode: converted to RGB)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default="models/checkpoint.pt")
    source.add_argument("--model", help="an MLflow model URI instead: runs:/<run id>/<model name>, models:/...")
    parser.add_argument("--decoding", help="how to decode: the JSON the evaluate stage wrote "
                                           "(default: decoding.json beside the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--beam-size", type=int,
                        help="captions kept per image while decoding, 1 = greedy (default: the decoding file's)")
    parser.add_argument("--attention", metavar="FOLDER",
                        help="also save FOLDER/<image>.attention.png: where the decoder looked for each word "
                             "(a checkpoint trained with model.decoder: attention)")
    args = parser.parse_args(argv)
    if args.beam_size is not None and args.beam_size < 1:
        parser.error(f"--beam-size must be >= 1, got {args.beam_size}")
    if args.model and (args.beam_size is not None or args.decoding or args.attention):
        parser.error("--beam-size, --decoding and --attention apply to --checkpoint; an MLflow model decodes "
                     "as its experiment's evaluate stage did")
    paths = image_files(args.inputs)
    captions = caption_with_logged_model(args.model, paths) if args.model else caption_with_checkpoint(args, paths)
    for path, caption in zip(paths, captions):
        print(f"{path}\t{caption}")
