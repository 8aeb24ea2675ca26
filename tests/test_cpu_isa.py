"""compute.cpu_isa: `avx2` pins the CPU kernels of ATen, oneDNN and MKL from inside the stage, as
if the process had started with the variables set; `native` leaves each library its widest."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import venv_env

PROBE = """
import hashlib, json, sys
import torch
from captioning import accel
from captioning.params import ComputeParams
if sys.argv[1] != "env":
    accel.prepare(ComputeParams(cpu_isa=sys.argv[1]))
torch.manual_seed(0)
a, b = torch.randn(257, 1031), torch.randn(1031, 263)
conv, x = torch.nn.Conv2d(32, 32, 3, padding=1), torch.randn(4, 32, 16, 16)
with torch.no_grad():
    outs = [a @ b, conv(x), torch.randn(64, 5000).log_softmax(1)]
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "bits": [hashlib.md5(t.numpy().tobytes()).hexdigest() for t in outs]}))
"""


def _probe(mode: str, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env={**venv_env(), **env},
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_avx2_from_params_equals_a_process_started_with_the_kernels_pinned():
    pinned = _probe("env", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_CBWR="AVX2")
    assert _probe("avx2") == pinned
    assert pinned["capability"] in ("AVX2", "DEFAULT")


def test_native_ignores_pins_left_in_the_environment():
    assert _probe("native", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_CBWR="AVX2") == \
        _probe("env")
