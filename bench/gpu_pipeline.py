"""The first run on a GPU: the default pipeline with `compute.device: cuda`, then the seed's model.

1. The default pipeline, stage by stage through `dvc repro`, in a scratch copy of the repo with
   `compute.device` set, plus two epochs of self-critical training (`SCST`): each stage's wall time. Its test captions (the evaluate stage's decoding
   and batching, `predict.caption_images`) are written out; the evaluate stage itself is not run
   there, so that the server needs neither Java nor the COCO scorer's METEOR data
   (`scripts/wheels.py --slim-scorer`). `--score` scores them on a machine that has them, beside
   `metrics/evaluate.json`.
2. The seed's model: ResNet-152 with random weights, frozen, 224 px input, embed 256, hidden 512,
   on `--seed-images` synthetic images: feature extraction (images/s), training on the cached
   features (steps/s of 128 captions) and greedy captioning (captions/s).

On an offline GPU server: `bash bench/gpu_pipeline.sh` (installs wheels/, runs this, writes $OUT).
Afterwards, on a machine with this project's venv: `python bench/gpu_pipeline.py --score <fetched>/gpu_pipeline.json`
On a CPU (the test): `python bench/gpu_pipeline.py --device cpu --quick --out /tmp/gpu`
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "resize", "vocab", "weights", "pretrain", "features", "train", "scst")
# Self-critical training is off by default; two epochs of it here check it under bf16 on the GPU.
SCST = {"scst": {"epochs": 2, "lr": 0.0005}}
# --quick: the same steps on a dataset small enough for a CPU test
QUICK = {"data": {"num_train": 40, "num_val": 8, "num_test": 8, "min_side": 100, "max_side": 160},
         "resize": {"side": 64}, "model": {"embed_size": 16, "hidden_size": 24},
         "pretrain": {"epochs": 1, "batch_size": 16}, "train": {"epochs": 1, "batch_size": 40},
         "scst": {"epochs": 1, "batch_size": 8}, "compute": {"num_workers": 0}}


def scratch_copy(target: Path) -> None:
    """The repo's tracked files (what a clone has), without outputs, caches or the venv."""
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode == 0:
        files = listed.stdout.splitlines()
    else:  # a copy without .git (as the server receives it): everything but generated folders
        skip = {".git", ".venv", "wheels", "mlartifacts", "tmp", "__pycache__"}
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()
                 and not skip & set(p.relative_to(REPO).parts) and not str(p.relative_to(REPO)).startswith(
                     ("data/", "models/", ".dvc/cache", ".dvc/tmp", "mlflow.db"))]
    for name in files:
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    for name in ("data/source.json", "models/imagenet.json", "dvc.lock"):  # outputs and the lock: made anew
        (target / name).unlink(missing_ok=True)


def run_pipeline(work: Path, device: str, quick: bool) -> tuple[dict, dict]:
    """(stage -> seconds, the test captions) of the default pipeline on `device`."""
    scratch_copy(work)
    from captioning.params import flatten, nest

    flat = flatten(yaml.safe_load((work / "params.yaml").read_text()))
    params = nest({**flat, **flatten(SCST), **flatten(QUICK if quick else {}), "compute.device": device})
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / ".dvc" / "config.local").write_text("[core]\n    no_scm = true\n")  # the server's copy has no .git
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    seconds = {}
    for stage in STAGES:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=work, env=env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        seconds[stage] = time.perf_counter() - started
        if done.returncode:
            sys.exit(f"gpu_pipeline: dvc repro {stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        print(next((line for line in done.stdout.splitlines() if line.startswith(f"{stage}: ")), stage), flush=True)
    return seconds, caption_test_split(work, device, params)


def caption_test_split(work: Path, device: str, params: dict) -> dict:
    """The evaluate stage's captions of the test split (its decoding and batching), timed."""
    from captioning import accel
    from captioning.checkpoint import load_checkpoint
    from captioning.layout import read_split
    from captioning.predict import Decoding, caption_images
    from captioning.text import Vocabulary

    settings = params["evaluate"]
    torch_device = accel.pick_device(device)
    model, vocab, _ = load_checkpoint(work / "models" / "checkpoint.pt",
                                      expect_vocab=Vocabulary.load(work / "data" / "vocab.json"))
    split = read_split(work / "data" / "resized", "test")
    records = split.captioned()
    decoding = Decoding(settings["beam_size"], settings["length_penalty"], params["compute"]["bf16"])
    paths = [split.image_path(r) for r in records]
    caption_images(model, vocab, paths[:2], torch_device, decoding, 2, progress=False)  # warm-up
    _sync(torch_device)
    started = time.perf_counter()
    captions = caption_images(model, vocab, paths, torch_device, decoding, settings["batch_size"],
                              params["compute"]["num_workers"], progress=False)
    _sync(torch_device)
    return {"seconds": time.perf_counter() - started, "decoding": decoding.describe(),
            "captions": {str(r["id"]): c for r, c in zip(records, captions)}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_seed_model(work: Path, device: str, images: int, epochs: int) -> dict:
    """The seed's ResNet-152 captioner (random weights, 224 px) on `images` synthetic images."""
    from captioning import accel, features
    from captioning.images import resize_all
    from captioning.layout import images_dir, read_split
    from captioning.model import Captioner
    from captioning.params import ComputeParams, DataParams, ModelParams, TrainParams
    from captioning.predict import Decoding, caption_images
    from captioning.synthetic import write_dataset
    from captioning.text import Vocabulary
    from captioning.training import Callbacks, fit, training_data

    cores = os.cpu_count() or 1
    write_dataset(work / "raw", dataclasses.replace(DataParams(), num_train=images, num_val=max(8, images // 20),
                                                    num_test=max(8, images // 20), workers=cores), seed=0)
    splits = {}
    for name in ("train", "val", "test"):
        raw = read_split(work / "raw", name)
        resize_all([(raw.image_path(r), images_dir(work / "resized", name) / r["file_name"]) for r in raw.images],
                   256, 95, workers=cores, desc=f"resize {name}")
        splits[name] = dataclasses.replace(raw, images_dir=images_dir(work / "resized", name))
    vocab = Vocabulary.build([c for cs in splits["train"].captions.values() for c in cs], 1)
    compute = ComputeParams(device=device, num_workers=max(1, cores - 1))
    runtime = accel.runtime(compute)
    torch_device = runtime.device
    torch.manual_seed(0)
    seed_model = ModelParams(backbone="resnet152", train_backbone=False, image_size=224, embed_size=256,
                             hidden_size=512)
    model = Captioner.build(seed_model, len(vocab))
    out = {}
    started = time.perf_counter()
    cached = tuple(features.extract(model.encoder.backbone, [s.image_path(r) for r in s.images],
                                    features.Views(224, 1, False), seed=0, batch_size=256, runtime=runtime,
                                    desc=f"features {name}")
                   for name, s in (("train", splits["train"]), ("val", splits["val"])))
    _sync(torch_device)
    out["features_seconds"] = time.perf_counter() - started
    out["features_images"] = sum(len(c) for c in cached)
    params = TrainParams(epochs=epochs, batch_size=128, captions_per_image=0, lr=0.001, log_every=10 ** 9,
                         select_metric="val_loss")
    started = time.perf_counter()
    result = fit(model, training_data(vocab, splits["train"], splits["val"], 224, params, cached), params, seed=0,
                 runtime=runtime, callbacks=Callbacks())
    _sync(torch_device)
    out["train_seconds"], out["train_steps"] = time.perf_counter() - started, result.steps
    test = [splits["test"].image_path(r) for r in splits["test"].images]
    greedy = Decoding(beam_size=1, length_penalty=0.0, bf16=compute.bf16)
    caption_images(model, vocab, test[:2], torch_device, greedy, 2, progress=False)  # warm-up
    _sync(torch_device)
    started = time.perf_counter()
    caption_images(model, vocab, test, torch_device, greedy, 256, compute.num_workers, progress=False)
    _sync(torch_device)
    out["caption_seconds"], out["captioned"] = time.perf_counter() - started, len(test)
    return out


def machine(device: str) -> str:
    gpu = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "no GPU"
    return (f"{gpu}; torch {torch.__version__}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPU cores")


def table(results: dict) -> str:
    rows = ["| step | seconds | rate |", "|---|---|---|"]
    for stage, seconds in results["pipeline_seconds"].items():
        rows.append(f"| default pipeline: {stage} | {seconds:.1f} | |")
    test = results["test_captions"]
    rows.append(f"| default pipeline: caption the test split ({test['decoding']}) | {test['seconds']:.2f} | "
                f"{len(test['captions']) / test['seconds']:,.0f} captions/s |")
    seed = results["seed_model"]
    rows.append(f"| seed model: features (ResNet-152, 224 px) | {seed['features_seconds']:.1f} | "
                f"{seed['features_images'] / seed['features_seconds']:,.0f} images/s |")
    rows.append(f"| seed model: train on cached features ({seed['train_steps']} steps of 128 captions) | "
                f"{seed['train_seconds']:.1f} | {seed['train_steps'] / seed['train_seconds']:,.1f} steps/s |")
    rows.append(f"| seed model: greedy captions | {seed['caption_seconds']:.2f} | "
                f"{seed['captioned'] / seed['caption_seconds']:,.0f} captions/s |")
    return "\n".join(rows)


def score(path: Path, data: Path, cpu_metrics: Path) -> dict:
    """COCO scores (and scene scores) of the server's test captions, beside this repo's CPU run."""
    from captioning import synthetic
    from captioning.layout import read_split
    from captioning.metrics import coco_scores

    results = json.loads(path.read_text())
    hypotheses = {int(k): v for k, v in results["test_captions"]["captions"].items()}
    split = read_split(data, "test")
    records = [r for r in split.captioned() if r["id"] in hypotheses]
    if len(records) != len(hypotheses):
        sys.exit(f"gpu_pipeline: {path} holds captions of images not in this repo's data/resized test split "
                 "(another data.* than the committed params?)")
    scores = coco_scores(split.captions, hypotheses)
    if synthetic.has_scenes(records):
        scores |= synthetic.scene_scores(records, hypotheses)
    cpu = json.loads(cpu_metrics.read_text()) if cpu_metrics.is_file() else {}
    print(f"{results['machine']}\n\n{table(results)}\n")
    print(f"| metric | {results['device']} run | CPU run ({cpu_metrics.name if cpu else 'none'}) |\n|---|---|---|")
    for key, value in scores.items():
        print(f"| {key} | {value:.3f} | {f'{cpu[key]:.3f}' if key in cpu else '-'} |")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="gpu-out", help="folder for gpu_pipeline.json")
    parser.add_argument("--seed-images", type=int, default=4096, help="train images for the seed's model")
    parser.add_argument("--seed-epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the same steps in a CPU test")
    parser.add_argument("--score", type=Path, help="score a GPU run's gpu_pipeline.json here, then stop")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "resized", help="with --score: its test split")
    parser.add_argument("--metrics", type=Path, default=REPO / "metrics" / "evaluate.json",
                        help="with --score: the CPU run's scores to show beside")
    parser.add_argument("--work", type=Path, help="scratch folder to keep (default: a temporary one)")
    args = parser.parse_args()
    if args.score:
        score(args.score, args.data, args.metrics)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_pipeline: no CUDA device here (use --device cpu to try the steps on a CPU)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-") as tmp:
        work = args.work or Path(tmp)
        seconds, captions = run_pipeline(work / "repo", args.device, args.quick)
        seed = run_seed_model(work / "seed", args.device, 16 if args.quick else args.seed_images,
                              1 if args.quick else args.seed_epochs)
    results = {"machine": machine(args.device), "device": args.device, "quick": args.quick,
               "pipeline_seconds": seconds, "test_captions": captions, "seed_model": seed,
               "total_seconds": time.perf_counter() - started}
    (out / "gpu_pipeline.json").write_text(json.dumps(results, indent=1))
    print(f"\n{results['machine']}; {results['total_seconds']:.0f} s in all\n\n{table(results)}\n\n"
          f"Scores: python bench/gpu_pipeline.py --score {out / 'gpu_pipeline.json'} (here, with Java)")


if __name__ == "__main__":
    main()
