"""train stage: fit the captioner, keep the best epoch by a validation metric, log to MLflow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from captioning import accel, synthetic, tracking
from captioning.checkpoint import save_checkpoint
from captioning.io import write_csv_atomic, write_json_atomic
from captioning.layout import read_split
from captioning.metrics import val_key
from captioning.params import load_params
from captioning.stage import run_stage
from captioning.text import Vocabulary
from captioning.training import Callbacks, captioner_and_data, fit, launch, resume_key

# What train depends on (dvc.yaml lists the same); the checkpoint stores exactly these.
PARAMS = ("seed", "model", "features", "train", "compute")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params, PARAMS)
    runtime = launch(params, sys.argv, tracking.connect)
    if runtime is None:
        return  # trained by the torchrun processes it started
    vocab = Vocabulary.load(args.vocab)
    key = resume_key(params, vocab, Path(args.data) / "train" / "captions.json", Path(args.backbone))
    resume = Path(args.resume_dir) / f"train-{key}.pt"
    splits = read_split(args.data, "train"), read_split(args.data, "val")
    scene_scores = synthetic.scorer(splits[1].captioned(), params.train.select_metric)
    if not runtime.world.is_main:
        model, data = captioner_and_data(splits, args.backbone, args.features, vocab, params, scene_scores)
        fit(model, data, params.train, seed=params.seed, runtime=runtime, callbacks=Callbacks(), resume_path=resume)
        accel.leave_distributed()
        return
    record = resume.with_suffix(".run.json")  # the MLflow run of this training, for a resumed try
    run, logs = tracking.training_run(args.params, record, resuming=resume.is_file(), epochs=params.train.epochs)
    with tracking.active(run):  # from here on: the run's system metrics cover reading the data too
        tracking.log_training_inputs(args.data, args.pretrain_curve)
        model, data = captioner_and_data(splits, args.backbone, args.features, vocab, params, scene_scores)
        print(f"train: {sum(p.numel() for p in model.parameters()):,} parameters on {runtime.device}"
              f"{f' x {runtime.world.size} processes' if runtime.world.size > 1 else ''}, from "
              f"{'cached features' if data.cached else 'images'}", flush=True)
        result = fit(model, data, params.train, seed=params.seed, runtime=runtime, callbacks=logs, resume_path=resume)
        accel.leave_distributed()
        save_checkpoint(args.checkpoint, model, vocab, params.to_dict(), state_dict=result.best_state)
        write_json_atomic(args.metrics, {
            "final_train_loss": result.final_train_loss, "best_epoch": result.best_epoch, "steps": result.steps,
            **{val_key(k): v for k, v in result.best.items() if k not in ("epoch", "train_loss")}})
        write_csv_atomic(Path(args.plots) / "train_loss.csv", [
            {k: r[k] for k in ("step", "epoch", "loss", "perplexity")} for r in result.step_rows])
        write_csv_atomic(Path(args.plots) / "val.csv", result.history)
        logs.finish(result, args.checkpoint, kept=resume)
    resume.unlink(missing_ok=True)  # finished: a rerun must start afresh, not resume
    record.unlink(missing_ok=True)
    metric = params.train.select_metric
    kept = "the last" if metric == "last" else f"best by {val_key(metric)} ({result.best[metric]:.3f})"
    print(f"train: {result.steps} steps in {result.seconds:.0f}s; kept epoch {result.best_epoch}, {kept} "
          f"-> {args.checkpoint}; MLflow run {run.info.run_name} ({run.info.run_id})")


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
