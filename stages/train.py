"""train stage: fit the captioner, keep the best epoch by a validation metric, log to MLflow."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import torch

from captioning import accel, features, lineage, synthetic, tracking
from captioning.checkpoint import save_checkpoint
from captioning.datasets import read_split
from captioning.errors import run_stage
from captioning.io import write_csv_atomic, write_json_atomic
from captioning.metrics import val_key
from captioning.model import Captioner
from captioning.params import ParamsError, load_params
from captioning.text import Vocabulary
from captioning.training import fit, training_data

# What train depends on (dvc.yaml lists the same); the checkpoint stores exactly these.
PARAMS = ("seed", "model", "features", "train", "compute")


def resume_key(params, vocab: Vocabulary, *inputs: Path) -> str:
    """Resume state is only valid for the same data, backbone, vocab and training params.

    The cached features are keyed by what makes them (the backbone file and `features.*`), not
    hashed: on COCO with several views they are gigabytes."""
    sections = params.to_dict()
    blob = json.dumps([params.seed, sections["model"], sections["train"], sections["features"], vocab.words,
                       [hashlib.sha256(path.read_bytes()).hexdigest() for path in inputs]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Quiet:
    """Callbacks of the ranks other than 0 under torchrun: only rank 0 logs."""

    def on_step(self, row: dict) -> None: ...

    def on_epoch(self, row: dict) -> None: ...


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params, PARAMS)
    here = accel.world()
    if accel.node_rank() >= params.train.nodes:  # a joining box whose params say it trains alone
        raise ParamsError(f"{accel.NODE_RANK}={accel.node_rank()}, but train.nodes is {params.train.nodes}: number "
                          f"the boxes 0 to {params.train.nodes - 1}, with the same params.yaml on each")
    if here.is_main and accel.node_rank() == 0:
        tracking.connect()  # a store that is down stops the stage here, before any work
    if params.train.processes * params.train.nodes > 1 and here.size == 1:
        command = accel.torchrun_command(params.train.processes, params.train.nodes, sys.argv)
        print(f"train: {params.train.nodes} node(s) x {params.train.processes} process(es): {' '.join(command)}",
              flush=True)
        status = subprocess.run(command).returncode
        if status:
            sys.exit(status)
        return
    torch.manual_seed(params.seed)
    device = accel.prepare(params.compute)
    here = accel.init_distributed(device)
    device = accel.device_for(device, here)
    vocab = Vocabulary.load(args.vocab)
    resume = Path(args.resume_dir) / "train-{}.pt".format(
        resume_key(params, vocab, Path(args.data) / "train" / "captions.json", Path(args.backbone)))
    if not here.is_main:
        fit_captioner(args, params, vocab, device, here, resume, Quiet())
        return
    record = resume.with_suffix(".run.json")  # the MLflow run of this training, for a resumed try
    run, logged_step, logged_epoch = tracking.training_run(args.params, record, resuming=resume.is_file())
    with tracking.active(run):
        tracking.log_datasets({split: (str(Path(args.data) / split), context)
                               for split, context in (("train", "training"), ("val", "validation"))})
        tracking.log_stage_times(lineage.stage_times(before="train"))
        if Path(args.pretrain_curve).is_file():
            tracking.log_curve(run.info.run_id, args.pretrain_curve, "pretrain_loss", "loss")
        logs = tracking.TrainingLogs(run.info.run_id, params.train.epochs, logged_step, logged_epoch)
        result = fit_captioner(args, params, vocab, device, here, resume, logs)
        write_json_atomic(args.metrics, {
            "final_train_loss": result.final_train_loss, "best_epoch": result.best_epoch, "steps": result.steps,
            **{val_key(k): v for k, v in result.best.items() if k not in ("epoch", "train_loss")}})
        write_csv_atomic(Path(args.plots) / "train_loss.csv", [
            {k: r[k] for k in ("step", "epoch", "loss", "perplexity")} for r in result.step_rows])
        write_csv_atomic(Path(args.plots) / "val.csv", result.history)
        logs.catch_up(result.step_rows, result.history)
        try:
            logs.mlflow.flush(final=True)
        except tracking.TrackingError as err:
            raise tracking.TrackingError(f"{err}. The training is kept ({resume}): run the stage again once the "
                                         "store answers, and it logs the run without training again") from None
        # Wall time goes to MLflow only: in the DVC metrics file it would differ run to run.
        # The checkpoint is logged once, inside the model evaluate logs with its decoding.
        mlflow.log_metrics({"best_epoch": result.best_epoch, "train_seconds": result.seconds})
        mlflow.set_tag(tracking.CHECKPOINT_MD5, hashlib.md5(Path(args.checkpoint).read_bytes()).hexdigest())
    resume.unlink(missing_ok=True)  # finished: a rerun must start afresh, not resume
    record.unlink(missing_ok=True)
    metric = params.train.select_metric
    kept = "the last" if metric == "last" else f"best by {val_key(metric)} ({result.best[metric]:.3f})"
    print(f"train: {result.steps} steps in {result.seconds:.0f}s; kept epoch {result.best_epoch}, {kept} "
          f"-> {args.checkpoint}; MLflow run {run.info.run_name} ({run.info.run_id})")


def fit_captioner(args, params, vocab, device, here, resume, callbacks):
    """Build the model and its data, train it, and (rank 0) write the checkpoint."""
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
    if here.is_main:
        print(f"train: {sum(p.numel() for p in model.parameters()):,} parameters on {device}"
              f"{f' x {here.size} processes' if here.size > 1 else ''}, from "
              f"{'cached features' if cached else 'images'}", flush=True)
    result = fit(model, data, params.train, seed=params.seed, device=device, callbacks=callbacks,
                 compute=params.compute, here=here, resume_path=resume)
    accel.leave_distributed()
    if here.is_main:
        save_checkpoint(args.checkpoint, model, vocab, params.to_dict(), state_dict=result.best_state)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="dataset folder (captions and images)")
    parser.add_argument("--vocab", required=True)
    parser.add_argument("--backbone", required=True, help="backbone weights (pretrain's output)")
    parser.add_argument("--features", required=True, help="cached backbone features (features' output)")
    parser.add_argument("--pretrain-curve", required=True,
                        help="pretrain's loss per step (a CSV), logged to the run beside train's own curves")
    parser.add_argument("--checkpoint", required=True, help="checkpoint to write")
    parser.add_argument("--metrics", required=True, help="train metrics JSON to write")
    parser.add_argument("--plots", required=True, help="folder for the loss/validation CSVs")
    parser.add_argument("--resume-dir", required=True, help="where resume state lives (not a DVC output)")
    run_stage("train", main, parser.parse_args())
