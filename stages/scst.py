"""scst stage: fine-tune train's cross-entropy checkpoint by self-critical sequence training, keep
the best epoch by a validation metric (epoch 0, train's model, included), log to MLflow.

With `scst.epochs: 0` the cross-entropy checkpoint is what evaluate reads, byte for byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

from captioning import accel, synthetic, tracking
from captioning.checkpoint import load_checkpoint, save_checkpoint
from captioning.io import atomic_path, file_digest, read_json, write_csv_atomic, write_json_atomic
from captioning.layout import read_split
from captioning.metrics import val_key
from captioning.params import load_params, parse_params
from captioning.scst import SelfCritical, reward_for, scst_data
from captioning.stage import run_stage
from captioning.training import Callbacks, data_for, fit, launch

PARAMS = ("seed", "scst", "compute", "train.processes", "train.nodes")
STEP_COLUMNS = ("step", "epoch", "loss", "reward", "baseline", "advantage", "advantage_sd")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params, PARAMS)
    settings = params.scst
    if settings.epochs == 0:
        pass_through(args)
        return
    runtime = launch(params, sys.argv, tracking.connect)
    if runtime is None:
        return  # trained by the torchrun processes it started
    model, vocab, trained_with = load_checkpoint(args.ce_checkpoint)
    ce_md5 = file_digest(args.ce_checkpoint, "md5")
    key = json.dumps([params.seed, dataclasses.asdict(settings), ce_md5, params.train.processes * params.train.nodes])
    resume = Path(args.resume_dir) / f"scst-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    splits = read_split(args.data, "train"), read_split(args.data, "val")
    data = scst_data(data_for(model, splits, args.features, vocab, parse_params(trained_with),
                              synthetic.scorer(splits[1].captioned(), settings.select_metric)), settings)
    objective = SelfCritical(model, vocab, reward_for(data.train.dataset, vocab), settings, runtime, data.cached)
    train = dict(seed=params.seed, runtime=runtime, resume_path=resume, objective=objective)
    if not runtime.world.is_main:
        fit(model, data, settings, callbacks=Callbacks(), **train)
        accel.leave_distributed()
        return
    record = resume.with_suffix(".run.json")  # the MLflow run of this training, for a resumed try
    run, logs = tracking.scst_run(args.params, ce_md5, record, resuming=resume.is_file(), epochs=settings.epochs)
    with tracking.active(run):
        print(f"scst: from {args.ce_checkpoint} on {runtime.device}"
              f"{f' x {runtime.world.size} processes' if runtime.world.size > 1 else ''}, from "
              f"{'cached features' if data.cached else 'images'}", flush=True)
        result = fit(model, data, settings, callbacks=logs, **train)
        accel.leave_distributed()
        if result.best_epoch == 0:  # no epoch beat train's model on val: it goes on unchanged
            copy_file(args.ce_checkpoint, args.checkpoint)
        else:
            origin = {**dataclasses.asdict(settings), "from_checkpoint_md5": ce_md5, "kept_epoch": result.best_epoch}
            save_checkpoint(args.checkpoint, model, vocab, {**trained_with, "scst": origin},
                            state_dict=result.best_state)
        write_json_atomic(args.metrics, {"best_epoch": result.best_epoch, "steps": result.steps,
                                         **{val_key(k): v for k, v in result.best.items()
                                            if k not in ("epoch", "train_loss")}})
        write_csv_atomic(Path(args.plots) / "steps.csv", [{k: r[k] for k in STEP_COLUMNS} for r in result.step_rows])
        write_csv_atomic(Path(args.plots) / "val.csv", [{k: v for k, v in r.items() if k != "train_loss"}
                                                        for r in result.history])
        logs.finish(result, args.checkpoint, kept=resume)
    resume.unlink(missing_ok=True)  # finished: a rerun must start afresh, not resume
    record.unlink(missing_ok=True)
    metric = settings.select_metric
    kept = f"epoch {result.best_epoch}" if result.best_epoch else "train's model (epoch 0)"
    why = "the last" if metric == "last" else f"best by {val_key(metric)} ({result.best[metric]:.3f})"
    print(f"scst: {result.steps} steps in {result.seconds:.0f}s; kept {kept}, {why} -> {args.checkpoint}; "
          f"MLflow run {run.info.run_name} ({run.info.run_id})")


def pass_through(args: argparse.Namespace) -> None:
    """scst.epochs 0: train's checkpoint and validation scores, unchanged, as this stage's."""
    load_checkpoint(args.ce_checkpoint)  # a checkpoint, or one line saying which is missing
    copy_file(args.ce_checkpoint, args.checkpoint)
    trained = read_json(args.train_metrics, missing="run the train stage first (dvc repro train)")
    scores = {k: v for k, v in trained.items() if k.startswith("val_")}
    write_json_atomic(args.metrics, {"best_epoch": 0, "steps": 0, **scores})
    write_csv_atomic(Path(args.plots) / "steps.csv", [])
    # One point, epoch 0, named as train's val.csv names its columns
    write_csv_atomic(Path(args.plots) / "val.csv", [{"epoch": 0, **{k if k == "val_loss" else k.removeprefix("val_"): v
                                                                      for k, v in scores.items()}}])
    print(f"scst: scst.epochs is 0: {args.ce_checkpoint} goes on unchanged -> {args.checkpoint}")


def copy_file(source: str | Path, target: str | Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="dataset folder (captions and images)")
    parser.add_argument("--features", required=True, help="cached backbone features (features' output)")
    parser.add_argument("--ce-checkpoint", required=True, help="train's cross-entropy checkpoint")
    parser.add_argument("--train-metrics", required=True, help="train's validation scores of that checkpoint")
    parser.add_argument("--checkpoint", required=True, help="checkpoint to write (what evaluate reads)")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write: validation scores of the epoch kept")
    parser.add_argument("--plots", required=True, help="folder for the per-step and per-epoch CSVs")
    parser.add_argument("--resume-dir", required=True, help="where resume state lives (not a DVC output)")
    run_stage("scst", main, parser.parse_args())
