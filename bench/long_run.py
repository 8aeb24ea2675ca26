"""Long-run check: many epochs of the real training loop keep memory and step time steady.

    python bench/long_run.py            # ~1 min on 2 idle CPU cores; prints a per-epoch table and a verdict last

Trains the real model with the real `captioning.training.fit` (called as stages/train.py calls it,
with params.yaml's model sizes and a frozen resnet18) on a small synthetic dataset generated
into a temporary folder (`synthetic.write_dataset`, then `resize_all` to 64 px), for many epochs. Each
epoch records:

* RSS of the main process at the end of the epoch (after fit's validation) and its maximum
  over the epoch's steps, and the largest summed RSS of the DataLoader worker processes (fit
  starts them afresh each epoch; a forked worker's RSS counts the pages it shares with the parent);
* the process's peak RSS so far (`ru_maxrss`), live Python objects and open file descriptors,
  which a leak of tensors, images or files would make grow;
* the median step time (the gap between consecutive steps; the first gap of an epoch includes the
  worker start and is left out) and the epoch's wall time;
* the cores other processes used meanwhile (`captioning.contention`, as in bench/benchmark.py): on a shared 2-core
  machine one busy neighbour makes torch's 2 OpenMP threads spin and a 70 ms step take 2.5 s
  (CPU time per step rises with it, so it is no way around this).

The verdict fits lines, after `--warmup` epochs (allocator and oneDNN caches fill during the first
ones): to the end-of-epoch RSS, over all those epochs and over the second half (a high-water mark
that rises in a few steps and then stays flat is not a leak; a leak keeps rising); and to the
median step times of the quiet epochs only (other processes under 0.1 core): drift in %/epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch

from captioning import accel
from captioning.contention import QUIET_LOAD, busy_cpu_seconds, other_load, own_cpu_seconds
from captioning.images import resize_all
from captioning.layout import SPLITS, images_dir, read_split
from captioning.model import Captioner
from captioning.params import ComputeParams, DataParams, load_params
from captioning.synthetic import write_dataset
from captioning.text import Vocabulary
from captioning.training import fit, training_data

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
STEADY_MIB_PER_EPOCH = 1.0  # below this, RSS counts as flat
STEADY_DRIFT_PER_EPOCH = 0.01  # below 1 %/epoch, step time counts as flat


class EpochProbe:
    """fit's callbacks: step times and memory, summarised per epoch."""

    def __init__(self):
        self.process = psutil.Process()
        self.rows: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self.step_times: list[float] = []
        self.max_rss = self.max_workers_rss = 0
        self.epoch_started = time.perf_counter()
        self.busy, self.own = busy_cpu_seconds(), own_cpu_seconds()

    def on_step(self, row: dict) -> None:
        self.step_times.append(time.perf_counter())
        self.max_rss = max(self.max_rss, self.process.memory_info().rss)
        workers = 0
        for child in self.process.children(recursive=True):
            try:
                workers += child.memory_info().rss
            except psutil.NoSuchProcess:  # a worker that just exited
                pass
        self.max_workers_rss = max(self.max_workers_rss, workers)

    def on_epoch(self, row: dict) -> None:
        gaps = [b - a for a, b in zip(self.step_times[1:], self.step_times[2:])]
        wall = time.perf_counter() - self.epoch_started
        others = other_load(self.busy, self.own, wall)
        gc.collect()
        self.rows.append({
            "epoch": row["epoch"],
            "rss_mib": self.process.memory_info().rss / MIB,
            "max_rss_mib": self.max_rss / MIB,
            "workers_rss_mib": self.max_workers_rss / MIB,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "objects": len(gc.get_objects()),
            "fds": len(os.listdir("/proc/self/fd")),
            "step_s": statistics.median(gaps) if gaps else float("nan"),
            "steps": len(self.step_times),
            "epoch_s": wall,
            "other_load": others,
            "train_loss": row["train_loss"],
            "cider": row["cider"],
        })
        print(f"[long-run] epoch {row['epoch']}: rss {self.rows[-1]['rss_mib']:.1f} MiB, "
              f"step {self.rows[-1]['step_s'] * 1000:.0f} ms, loss {row['train_loss']:.3f}", flush=True)
        self._reset()


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def prepare(root: Path, n_train: int, n_val: int, seed: int, side: int) -> Vocabulary:
    raw, resized = root / "raw", root / "resized"
    # Small sources: generation and resizing are not what is measured.
    write_dataset(raw, DataParams(num_train=n_train, num_val=n_val, num_test=1, min_side=96, max_side=160,
                                    workers=0), seed)
    for split in SPLITS:
        pairs = [(images_dir(raw, split) / r["file_name"], images_dir(resized, split) / r["file_name"])
                 for r in read_split(raw, split).images]
        resize_all(pairs, side, 95, workers=0, desc=f"resize {split}")
    train = read_split(raw, "train")
    return Vocabulary.build((c for caps in train.captions.values() for c in caps), threshold=1)


def table(rows: list[dict]) -> str:
    header = ("epoch", "RSS end, MiB", "RSS max, MiB", "workers RSS, MiB", "peak RSS, MiB", "Python objects",
              "open fds", "step, ms", "steps", "epoch, s", "other load, cores", "train loss", "val CIDEr")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append(f"| {r['epoch']} | {r['rss_mib']:.1f} | {r['max_rss_mib']:.1f} | {r['workers_rss_mib']:.1f} | "
                     f"{r['peak_rss_mib']:.1f} | {r['objects']} | {r['fds']} | {r['step_s'] * 1000:.0f} | "
                     f"{r['steps']} | {r['epoch_s']:.1f} | {r['other_load']:.2f} | {r['train_loss']:.3f} | {r['cider']:.3f} |")
    return "\n".join(lines)


def verdict(rows: list[dict], warmup: int) -> str:
    steady = rows[warmup:]
    epochs = [r["epoch"] for r in steady]
    late = steady[len(steady) // 2:]
    growth = slope(epochs, [r["rss_mib"] for r in steady])
    late_growth = slope([r["epoch"] for r in late], [r["rss_mib"] for r in late])
    worker_growth = slope(epochs, [r["workers_rss_mib"] for r in steady])
    objects = slope(epochs, [r["objects"] for r in steady])
    memory_ok = max(abs(growth), abs(late_growth), abs(worker_growth)) < STEADY_MIB_PER_EPOCH
    lines = [
        f"Epochs {epochs[0]}-{epochs[-1]} (after {warmup} warm-up epochs):",
        f"- main RSS {growth:+.2f} MiB/epoch over all, {late_growth:+.2f} MiB/epoch over epochs "
        f"{late[0]['epoch']}-{late[-1]['epoch']} (end-of-epoch RSS {steady[0]['rss_mib']:.1f} -> "
        f"{late[0]['rss_mib']:.1f} -> {steady[-1]['rss_mib']:.1f} MiB); DataLoader worker RSS "
        f"{worker_growth:+.2f} MiB/epoch; Python objects {objects:+.1f}/epoch; open fds {rows[0]['fds']} -> "
        f"{rows[-1]['fds']}; peak RSS {rows[-1]['peak_rss_mib']:.1f} MiB",
    ]
    quiet = [r for r in steady if r["other_load"] < QUIET_LOAD]
    if len(quiet) >= 5:
        times = [r["step_s"] for r in quiet]
        mean = statistics.fmean(times)
        drift = slope([r["epoch"] for r in quiet], times) / mean
        third = len(quiet) // 3
        ratio = statistics.fmean(times[-third:]) / statistics.fmean(times[:third])
        time_ok = abs(drift) < STEADY_DRIFT_PER_EPOCH
        lines.append(f"- step time on the {len(quiet)} quiet epochs ({quiet[0]['epoch']}-{quiet[-1]['epoch']}): "
                     f"{mean * 1000:.0f} ms mean (min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}), drift "
                     f"{drift * 100:+.2f} %/epoch, last third / first third {ratio:.3f}x")
        time_verdict = (f"step time {'steady' if time_ok else 'DRIFTS'} "
                        f"(|drift| < {STEADY_DRIFT_PER_EPOCH * 100:g} %/epoch)")
    else:
        time_verdict = f"step time NOT JUDGED: only {len(quiet)} quiet epochs (run again on an idle machine)"
    lines.append(f"- {len(steady) - len(quiet)} of {len(steady)} epochs contended (other processes >= "
                 f"{QUIET_LOAD} core); their step times are left out")
    lines.append(f"VERDICT: memory {'steady' if memory_ok else 'GROWS'} (|growth| < {STEADY_MIB_PER_EPOCH:g} "
                 f"MiB/epoch), {time_verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--n-train", type=int, default=400, help="synthetic train images")
    parser.add_argument("--n-val", type=int, default=40, help="validation images (fit captions them every epoch)")
    parser.add_argument("--batch-size", type=int, default=32, help="train.batch_size: captions per step")
    parser.add_argument("--side", type=int, default=64, help="resize side of the stored images")
    parser.add_argument("--image-size", type=int, default=32, help="model.image_size")
    parser.add_argument("--num-workers", type=int, default=1, help="train.num_workers")
    parser.add_argument("--warmup", type=int, default=3, help="epochs left out of the fits")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    repo = load_params(REPO / "params.yaml")
    # params.yaml's model and train settings, scaled down where a CPU run of many epochs needs it.
    model_params = dataclasses.replace(repo.model, pretrained=False, weights_path="", image_size=args.image_size)
    train_params = dataclasses.replace(repo.train, epochs=args.epochs, batch_size=args.batch_size,
                                       log_every=1, checkpoint_every=10**9, patience=0,
                                       )
    compute = ComputeParams(device="cpu", num_workers=args.num_workers)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="caption-long-run-") as tmp:
        root = Path(tmp)
        vocab = prepare(root, args.n_train, args.n_val, args.seed, args.side)
        train, val = (dataclasses.replace(read_split(root / "raw", name), images_dir=images_dir(root / "resized", name))
                      for name in ("train", "val"))
        torch.manual_seed(args.seed)
        model = Captioner.build(model_params, len(vocab))
        probe = EpochProbe()
        print(f"[long-run] data ready in {time.perf_counter() - started:.0f} s; training {args.epochs} epochs "
              f"of {len(train.images)} images", flush=True)
        data = training_data(vocab, train, val, model_params.image_size, train_params)
        result = fit(model, data, train_params, seed=args.seed, runtime=accel.Runtime(torch.device("cpu"), compute),
                     callbacks=probe)
    print(f"\n[long-run] {result.steps} steps in {result.seconds:.0f} s; total {time.perf_counter() - started:.0f} s")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; "
          f"model {model_params}; train {train_params}\n")
    print(table(probe.rows))
    print()
    print(verdict(probe.rows, args.warmup))


if __name__ == "__main__":
    main()
