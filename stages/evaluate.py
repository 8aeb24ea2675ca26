"""evaluate stage: caption the test split, score it the COCO way, write a gallery, log to MLflow."""

from __future__ import annotations

import argparse

import mlflow

from captioning import accel
from captioning.checkpoint import load_checkpoint
from captioning.datasets import read_split
from captioning.io import write_json_atomic, write_text_atomic
from captioning.metrics import coco_scores, grounded_score
from captioning.params import load_params
from captioning.predict import caption_images, pick_device
from captioning.report import GalleryItem, gallery_html
from captioning.synthetic import mentioned_objects, scene_objects
from captioning.text import Vocabulary
from captioning.tracking import experiment_id, reopen_run


def main(args: argparse.Namespace) -> None:
    all_params = load_params(args.params)
    params = all_params.evaluate
    model, vocab, _ = load_checkpoint(args.checkpoint, expect_vocab=Vocabulary.load(args.vocab))
    split = read_split(args.data, "test", images_root=args.images)
    records = [r for r in split.images if split.captions[r["id"]]]
    device = pick_device(params.device)
    accel.setup(device, all_params.train.deterministic)
    captions = caption_images(model, vocab, [split.image_path(r) for r in records], device,
                              params.batch_size, params.num_workers, beam_size=params.beam_size,
                              length_penalty=params.length_penalty, bf16=all_params.train.bf16)
    hypotheses = {r["id"]: c for r, c in zip(records, captions)}
    scores = coco_scores(split.captions, hypotheses)
    scenes = {r["id"]: r["scene"] for r in records if "scene" in r}
    if len(scenes) == len(records):
        scores["grounded"] = grounded_score(scenes, hypotheses)
    scores = {k: round(v, 6) for k, v in scores.items()}
    write_json_atomic(args.metrics, scores)
    results = [{"image_id": i, "caption": c} for i, c in hypotheses.items()]  # COCO results format
    write_json_atomic(args.captions, results)
    items = [GalleryItem(split.image_path(r), hypotheses[r["id"]], split.captions[r["id"]],
                         mentioned_objects(hypotheses[r["id"]]) == scene_objects(r["scene"]) if "scene" in r else None)
             for r in records[: params.gallery_size]]
    write_text_atomic(args.gallery, gallery_html(items, "Test captions", scores))

    experiment_id()
    with reopen_run(args.run_info, "evaluate"):
        mlflow.log_metrics({f"test_{k}": v for k, v in scores.items()})
        mlflow.log_artifact(args.gallery, artifact_path="evaluate")
        mlflow.log_artifact(args.captions, artifact_path="evaluate")
    decoding = "greedy" if params.beam_size == 1 else f"beam {params.beam_size}, length penalty {params.length_penalty:g}"
    print("evaluate: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
          + f" on {len(records)} test images ({decoding}) -> {args.metrics}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--vocab", required=True, help="the pipeline's vocabulary; must match the checkpoint's")
    parser.add_argument("--data", required=True, help="dataset folder (captions)")
    parser.add_argument("--images", required=True, help="resized images folder")
    parser.add_argument("--run-info", required=True, help="train's record of the MLflow run")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--captions", required=True, help="COCO results JSON to write")
    parser.add_argument("--gallery", required=True, help="HTML gallery to write")
    main(parser.parse_args())
