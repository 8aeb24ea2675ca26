"""evaluate stage: caption the test split, score it the COCO way, write a gallery, log to MLflow.

It also records how it decoded (beside the checkpoint) and logs the model that decodes that way,
so what is served is what was scored, and registers that model as a new version of
`evaluate.registered_model`, moving its `champion` alias when the version is better on validation.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from captioning import accel, lineage, registry, synthetic, tracking
from captioning.checkpoint import load_checkpoint
from captioning.io import file_digest, write_json_atomic, write_text_atomic
from captioning.layout import read_split
from captioning.metrics import coco_scores
from captioning.params import load_params
from captioning.predict import Decoding, caption_images
from captioning.report import GalleryItem, gallery_html
from captioning.serving import log_pyfunc, model_name
from captioning.stage import run_stage
from captioning.text import Vocabulary

PARAMS = ("evaluate", "compute")


def main(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    params = load_params(args.params, PARAMS)
    settings = params.evaluate
    tracking.connect()  # a store that is down stops the stage here, before any work
    registry.check_name(MlflowClient(), settings.registered_model, tracking.store_label())
    runtime = accel.runtime(params.compute)  # before any tensor work: it picks the CPU kernels
    model, vocab, trained_with = load_checkpoint(args.checkpoint, expect_vocab=Vocabulary.load(args.vocab))
    split = read_split(args.data, "test")
    records = split.captioned()
    decoding = Decoding(settings.beam_size, settings.length_penalty, params.compute.bf16)
    captions = caption_images(model, vocab, [split.image_path(r) for r in records], runtime.device, decoding,
                              settings.batch_size, params.compute.num_workers)
    hypotheses = {r["id"]: c for r, c in zip(records, captions)}
    scores = coco_scores(split.captions, hypotheses)
    scenes = synthetic.has_scenes(records)
    if scenes:
        scores |= synthetic.scene_scores(records, hypotheses)
    scores = {k: round(v, 6) for k, v in scores.items()}
    write_json_atomic(args.metrics, scores)
    decoding.save(args.decoding)
    write_json_atomic(args.captions, [{"image_id": i, "caption": c} for i, c in hypotheses.items()])  # COCO format
    items = [GalleryItem(split.image_path(r), hypotheses[r["id"]], split.captions[r["id"]],
                         synthetic.verdict(hypotheses[r["id"]], r["scene"]) if scenes else None)
             for r in records[: settings.gallery_size]]
    title = f"Test captions ({decoding.describe()})"
    write_text_atomic(args.gallery, gallery_html(items, title, scores))
    selected_by = (trained_with.get("scst") or trained_with["train"])["select_metric"]  # what kept its epoch
    run, verdict = record(args, settings.registered_model, scores, lambda about: gallery_html(items, title, scores, about),
                          split.image_path(records[0]), selected_by, started)
    print("evaluate: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
          + f" on {len(records)} test images ({decoding.describe()}) -> {args.metrics}; MLflow run "
          f"{run.info.run_name}, in `mlflow ui` at /#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
          "?workflowType=machine_learning")
    print(verdict)


def record(args: argparse.Namespace, name: str, scores: dict[str, float], gallery: Callable[[dict], str],
           example: Path, select_metric: str, started: float) -> tuple[mlflow.ActiveRun, str]:
    """Log the evaluation to the run that trained the checkpoint (or a run of its own), log the
    model that decodes as evaluate did, register it as a version of `name` and write run-info.
    Returns (the run, what the champion check said)."""
    run, trained_in = tracking.evaluation_run(args.params, file_digest(args.checkpoint, "md5"))
    with tracking.active(run):
        tracking.log_evaluation(args.params, args.data, scores, gallery, args.captions, trained_in)
        logged = log_pyfunc(args.checkpoint, args.decoding, example, model_name(run.info.run_name))
        held = mlflow.get_run(run.info.run_id)
        inputs = [str(Path(args.data) / s) for s in ("train", "val", "test")] + [args.vocab, args.checkpoint]
        tags = registry.version_tags(json.loads(Path(args.val_metrics).read_text()), held, inputs)
        version, verdict = registry.register_and_promote(MlflowClient(), name, logged.model_uri, tags, select_metric)
        tracking.log_stage_times({**lineage.stage_times(before="evaluate"),
                                  "evaluate": time.perf_counter() - started}, held.data.tags)
        tracking.add_note(held, f"test: {', '.join(f'{k} {v:.3f}' for k, v in scores.items())}\n\n{verdict}")
        tracking.write_run_info(args.run_info, run, train_run_id=trained_in, model_uri=f"models:/{name}/{version.version}",
                                registered_model=name, model_version=version.version, logged_model_id=logged.model_id)
    return run, verdict


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--vocab", required=True, help="the pipeline's vocabulary; must match the checkpoint's")
    parser.add_argument("--data", required=True, help="dataset folder (captions and images)")
    parser.add_argument("--val-metrics", required=True,
                        help="the checkpoint's validation scores (the registry compares versions on them)")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--decoding", required=True, help="decoding JSON to write (for caption and the MLflow model)")
    parser.add_argument("--captions", required=True, help="COCO results JSON to write")
    parser.add_argument("--gallery", required=True, help="HTML gallery to write")
    parser.add_argument("--run-info", required=True, help="JSON to write: this experiment's MLflow run and model")
    run_stage("evaluate", main, parser.parse_args())
