"""scripts/setup.sh's TORCH_CUDA switch. download.pytorch.org cannot be reached from here, so the
plumbing is checked by a dry run: the pip commands it would run."""

import os
import subprocess

from conftest import REPO


def _setup(**env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], capture_output=True, text=True,
                          env={**os.environ, "SETUP_DRY_RUN": "1", **env})


def test_torch_cuda_installs_the_same_versions_built_for_another_cuda():
    pins = dict(line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines()
                if line.startswith(("torch==", "torchvision==")))
    done = _setup(TORCH_CUDA="cu126")
    assert done.returncode == 0, done.stderr
    commands = [line for line in done.stdout.splitlines() if " pip install " in line]
    first = commands[0].split()
    assert first[first.index("--index-url") + 1] == "https://download.pytorch.org/whl/cu126"
    assert first[-2:] == [f"torch=={pins['torch']}+cu126", f"torchvision=={pins['torchvision']}+cu126"]
    assert commands[1].endswith("-r requirements.txt")  # every other pin as it is
    cpu = _setup(TORCH_CUDA="cpu").stdout
    assert f"torch=={pins['torch']}+cpu" in cpu and "whl/cpu" in cpu


def test_without_torch_cuda_pypi_builds_are_installed_and_a_bad_value_is_refused():
    default = _setup().stdout
    assert "--index-url" not in default and "-r requirements.txt" in default
    bad = _setup(TORCH_CUDA="cuda12")
    assert bad.returncode == 2 and "TORCH_CUDA=cuda12: expected cpu or cuNNN" in bad.stderr


def test_wheels_installs_from_that_folder_alone(tmp_path):
    commands = [line for line in _setup(WHEELS=str(tmp_path)).stdout.splitlines() if " pip install " in line]
    assert len(commands) == 2 and all(f" --no-index --find-links {tmp_path} " in c for c in commands)
    assert commands[0].endswith("-r requirements.txt") and commands[1].endswith("--no-deps -e .")
    missing = _setup(WHEELS=str(tmp_path / "none"))
    assert missing.returncode == 2 and f"WHEELS={tmp_path / 'none'}: no such folder" in missing.stderr
    both = _setup(WHEELS=str(tmp_path), TORCH_CUDA="cu126")  # the bundle holds the torch it was made with
    assert both.returncode == 2 and "TORCH_CUDA applies to installs from the network" in both.stderr
