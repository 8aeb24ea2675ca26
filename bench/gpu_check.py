"""GPU throughput of the seed's configuration (ResNet-152, embed 256, hidden 512) on synthetic data.

Measures, on one CUDA device: feature extraction images/s (frozen backbone, bf16 autocast,
channels_last, batch 256), from preloaded tensors (GPU-bound) and through the DataLoader decoding
the resized JPEGs (what the pipeline does); train steps/s of the seed's loop (frozen backbone,
batch 128 captions, bf16); and batched greedy captions/s. Needs only torch, torchvision, Pillow,
PyYAML and tqdm, so it runs on a bare GPU box:

    python bench/gpu_check.py --images 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import DataLoader

from captioning.data import ImageDataset
from captioning.datasets import images_dir, read_split
from captioning.images import Transform, resize_all
from captioning.model import Captioner
from captioning.params import DataParams, ModelParams
from captioning.synthetic import write_dataset
from captioning.text import Vocabulary

SEED_MODEL = ModelParams(backbone="resnet152", train_backbone=False, image_size=224, embed_size=256,
                         hidden_size=512, num_layers=1, max_seq_len=20)


def timed(fn, repeats: int) -> float:
    """Seconds per call after a warm-up, with the GPU drained before and after."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=4096)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    work = Path(tempfile.mkdtemp())
    data = dataclasses.replace(DataParams(), num_train=args.images, num_val=8, num_test=8, workers=os.cpu_count())
    write_dataset(work / "raw", data, seed=0)
    split = read_split(work / "raw", "train")
    pairs = [(split.image_path(r), images_dir(work / "resized", "train") / r["file_name"]) for r in split.images]
    resize_all(pairs, 256, 95, workers=os.cpu_count())
    paths = [dst for _, dst in pairs]
    vocab = Vocabulary.build([c for cs in split.captions.values() for c in cs], 1)

    torch.manual_seed(0)
    model = Captioner.build(dataclasses.replace(SEED_MODEL, pretrained=False), len(vocab)).to(device)
    model = model.to(memory_format=torch.channels_last).eval()
    rows = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, {os.cpu_count()} CPU cores"]

    batch = torch.randn(256, 3, 224, 224, device=device).to(memory_format=torch.channels_last)

    def extract():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.encoder.cnn(batch)

    rows.append(f"feature extraction, preloaded tensors (GPU-bound): {256 / timed(extract, 10):,.0f} images/s")

    loader = DataLoader(ImageDataset(paths, Transform(224)), batch_size=256, num_workers=os.cpu_count() - 1,
                        pin_memory=True, persistent_workers=True)
    for _ in loader:  # warm the workers and the page cache
        break
    start, seen = time.perf_counter(), 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for images in loader:
            model.encoder.cnn(images.to(device, non_blocking=True).to(memory_format=torch.channels_last))
            seen += len(images)
    torch.cuda.synchronize()
    rows.append(f"feature extraction through the DataLoader (JPEG decode, {os.cpu_count() - 1} workers): "
                f"{seen / (time.perf_counter() - start):,.0f} images/s")

    # The seed's step: 128 captions over 128 images, frozen backbone, Adam on decoder + head.
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.001)
    captions = torch.randint(4, len(vocab), (128, 14), device=device)
    lengths = torch.full((128,), 14)
    index = torch.arange(128, device=device)
    images = torch.randn(128, 3, 224, 224, device=device).to(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(images, captions, lengths, index)
            loss = torch.nn.functional.cross_entropy(logits.float(), pack_padded_sequence(captions, lengths, batch_first=True).data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    rows.append(f"train step, 128 captions, frozen ResNet-152, bf16: {1 / timed(step, 20):.1f} steps/s")

    model.eval()

    def caption():
        model.generate(batch, vocab.end_id, beam_size=1, length_penalty=0.0, bf16=True)  # greedy; CNN in bf16

    rows.append(f"batched greedy captioning (batch 256, up to 20 tokens), bf16: {256 / timed(caption, 5):,.0f} captions/s")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
