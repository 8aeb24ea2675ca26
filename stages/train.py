"""train stage: fit the captioner, keep the best epoch by a validation metric, log to MLflow."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import torch

from captioning import accel, features, synthetic
from captioning.checkpoint import save_checkpoint
from captioning.datasets import read_split
from captioning.errors import run_stage
from captioning.io import write_json_atomic, write_text_atomic
from captioning.model import Captioner
from captioning.params import ParamsError, load_params
from captioning.text import Vocabulary
from captioning.tracking import MetricLogger, start_pipeline_run, write_run_info
from captioning.training import fit, training_data

# What train depends on (dvc.yaml lists the same); the checkpoint stores exactly these.
PARAMS = ("seed", "model", "features", "train", "compute")


def val_key(name: str) -> str:
    """A validation row's key as metrics/train.json and MLflow name it: cider -> val_cider."""
    return name if name.startswith("val_") else f"val_{name}"


class Logs:
    """Training callbacks: print like the seed, buffer rows for the plot files, send to MLflow."""

    def __init__(self, run_id: str, epochs: int):
        self.steps, self.epochs, self.total_epochs = [], [], epochs
        self.mlflow = MetricLogger(run_id)

    def on_step(self, row: dict) -> None:
        self.steps.append(row)
        print(f"Epoch [{row['epoch']}/{self.total_epochs}], Step [{row['batch']}/{row['batches']}], "
              f"Loss: {row['loss']:.4f}, Perplexity: {row['perplexity']:5.4f}", flush=True)
        self.mlflow.log({"train_loss": row["loss"], "train_perplexity": row["perplexity"]}, row["step"])

    def on_epoch(self, row: dict) -> None:
        self.epochs.append(row)
        scores = {k: v for k, v in row.items() if k not in ("epoch", "best_epoch", "train_loss")}
        print(f"epoch {row['epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
        # train_loss is already a per-step curve
        self.mlflow.log({val_key(k): v for k, v in scores.items()}, row["epoch"])
        self.mlflow.flush()


def resume_key(params, vocab: Vocabulary, *inputs: Path) -> str:
    """Resume state is only valid for the same data, backbone, vocab and training params.

    The cached features are keyed by what makes them (the backbone file and `features.*`), not
    hashed: on COCO with several views they are gigabytes."""
    sections = params.to_dict()
    blob = json.dumps([params.seed, sections["model"], sections["train"], sections["features"], vocab.words,
                       [hashlib.sha256(path.read_bytes()).hexdigest() for path in inputs]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["step"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


class Quiet:
    """Callbacks of the ranks other than 0 under torchrun: only rank 0 logs."""

    def on_step(self, row: dict) -> None: ...

    def on_epoch(self, row: dict) -> None: ...


def relaunch_under_torchrun(processes: int) -> None:
    """Run this same command as `processes` DDP processes (torchrun), then exit with their status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", sys.argv[0], *sys.argv[1:]]
    print(f"train: train.processes is {processes}: {' '.join(command)}", flush=True)
    sys.exit(subprocess.run(command).returncode)


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params, PARAMS)
    here = accel.world()
    if params.train.processes > 1 and here.size == 1:
        relaunch_under_torchrun(params.train.processes)
    torch.manual_seed(params.seed)
    device = accel.prepare(params.compute)
    here = accel.init_distributed(device)
    device = accel.device_for(device, here)
    vocab = Vocabulary.load(args.vocab)
    train_split, val_split = read_split(args.data, "train"), read_split(args.data, "val")
    scenes = synthetic.has_scenes(val_split.captioned())
    if params.train.select_metric in synthetic.SCENE_METRICS and not scenes:
        raise ParamsError(f"train.select_metric is {params.train.select_metric}, which needs the synthetic "
                          "dataset's scenes; this dataset has none: pick cider, bleu_4 or val_loss")
    backbone_state = torch.load(args.backbone, map_location="cpu", weights_only=True)
    model = Captioner.build(params.model, len(vocab), backbone_state)
    cached = None
    if not params.model.train_backbone:  # the backbone is frozen: its output is cached
        size = model.encoder.feature_size
        cached = tuple(features.read(args.features, name, [r["id"] for r in split.images], size,
                                     grid=params.model.decoder == "attention")
                       for name, split in (("train", train_split), ("val", val_split)))
    data = training_data(vocab, train_split, val_split, params.model.image_size, params.train, cached,
                         synthetic.scene_scores if scenes else None)
    resume = Path(args.resume_dir) / "train-{}.pt".format(
        resume_key(params, vocab, Path(args.data) / "train" / "captions.json", Path(args.backbone)))

    def train(callbacks):
        result = fit(model, data, params.train, seed=params.seed, device=device, callbacks=callbacks,
                     compute=params.compute, here=here, resume_path=resume)
        accel.leave_distributed()
        return result

    if not here.is_main:
        train(Quiet())
        return
    with start_pipeline_run(args.params, "train") as run:
        logs = Logs(run.info.run_id, params.train.epochs)
        print(f"train: {sum(p.numel() for p in model.parameters()):,} parameters on {device}"
              f"{f' x {here.size} processes' if here.size > 1 else ''}, from "
              f"{'cached features' if cached else 'images'}; MLflow run {run.info.run_name} ({run.info.run_id})")
        result = train(logs)
        save_checkpoint(args.checkpoint, model, vocab, params.to_dict(), state_dict=result.best_state)
        metrics = {"final_train_loss": result.final_train_loss, "best_epoch": result.best_epoch,
                   "steps": result.steps,
                   **{val_key(k): v for k, v in result.best.items() if k not in ("epoch", "train_loss")}}
        write_json_atomic(args.metrics, metrics)
        write_csv(Path(args.plots) / "train_loss.csv", [
            {k: r[k] for k in ("step", "epoch", "loss", "perplexity")} for r in logs.steps])
        write_csv(Path(args.plots) / "val.csv", [
            {k: v for k, v in r.items() if k != "best_epoch"} for r in logs.epochs])
        logs.mlflow.flush()
        # Wall time goes to MLflow only: in the DVC metrics file it would differ run to run.
        # The checkpoint is logged once, inside the model evaluate logs with its decoding.
        mlflow.log_metrics({"best_epoch": result.best_epoch, "train_seconds": result.seconds})
        write_run_info(args.run_info, run)
    resume.unlink(missing_ok=True)  # finished: a rerun must start afresh, not resume
    metric = params.train.select_metric
    kept = "the last" if metric == "last" else f"best by {val_key(metric)} ({result.best[metric]:.3f})"
    print(f"train: {result.steps} steps in {result.seconds:.0f}s; kept epoch {result.best_epoch}, {kept} "
          f"-> {args.checkpoint}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="dataset folder (captions and images)")
    parser.add_argument("--vocab", required=True)
    parser.add_argument("--backbone", required=True, help="backbone weights (pretrain's output)")
    parser.add_argument("--features", required=True, help="cached backbone features (features' output)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint to write")
    parser.add_argument("--metrics", required=True, help="train metrics JSON to write")
    parser.add_argument("--plots", required=True, help="folder for the loss/validation CSVs")
    parser.add_argument("--run-info", required=True, help="JSON to write: the MLflow run that trained the checkpoint")
    parser.add_argument("--resume-dir", required=True, help="where resume state lives (not a DVC output)")
    run_stage("train", main, parser.parse_args())
