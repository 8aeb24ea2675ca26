"""bench/benchmark.py end to end on a few images: its pieces run, and the seed's way of captioning
and ours give the same captions (the comparison is only fair if they do)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO, venv_env


@pytest.mark.slow
def test_benchmark_runs_and_both_ways_caption_alike():
    pieces = "seed_style,ours_cached,eval_seed_single,eval_batched,scale_24,scale_48"
    result = subprocess.run(
        [sys.executable, "bench/benchmark.py", "--n-train", "24", "--n-test", "6", "--image-sizes", "32",
         "--scale-sizes", "24,48", "--only", pieces, "--attempts", "1", "--max-wait", "0"],
        cwd=REPO, env=venv_env(), capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("| Measure"):]
    assert re.search(r"\| 32 px: Train epoch, s; A seed-style loop, B `fit` on cached features .*\| \d+\.\d+x +\|", table)
    greedy = re.search(r"32 px: Greedy captioning: identical captions, A vs B *\| *\| (\d+)/(\d+)", table)
    assert greedy and greedy.group(1) == greedy.group(2) == "6", table
    scaling = re.findall(r"Scaling of B \(32 px, from images\): one epoch of (\d+) images", table)
    assert scaling == ["24", "48"], table
