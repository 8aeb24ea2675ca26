"""scripts/wheels.py and `WHEELS=... scripts/setup.sh`: a bundle made for this Python and platform
installs the project into a fresh venv with no index at all. The download side uses pip's own
configuration (PyPI or a mirror); the install side sees nothing but the folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, venv_env

# A platform wheel, and a package published as source only (built here into a pure-Python wheel).
TINY = "pyyaml==6.0.3\nantlr4-python3-runtime==4.9.3  # source only\n"


def _offline_env() -> dict[str, str]:
    """No pip configuration (no index, no extra wheel folder): only what the command line names."""
    env = {k: v for k, v in venv_env().items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull}


@pytest.mark.slow  # seconds of subprocesses: CI runs it, the edit-test loop does not
def test_a_bundle_installs_the_project_into_a_fresh_venv_without_an_index(tmp_path):
    (tmp_path / "requirements.txt").write_text(TINY)
    wheels = tmp_path / "wheels"
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "wheels.py"), "--requirements",
                           str(tmp_path / "requirements.txt"), "--out", str(wheels)],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert made.returncode == 0, made.stderr[-3000:]
    names = sorted(p.name.split("-")[0].lower() for p in wheels.glob("*.whl"))
    assert names == ["antlr4_python3_runtime", "pyyaml", "setuptools"]  # setuptools: the project's build
    assert "built here: antlr4-python3-runtime==4.9.3" in made.stdout
    assert made.stdout.splitlines()[-1].startswith("3 wheels, ")

    # The server's copy of the project: its source and these requirements.
    server = tmp_path / "server"
    shutil.copytree(REPO / "src", server / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "scripts", server / "scripts")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, server / name)
    shutil.copy2(tmp_path / "requirements.txt", server / "requirements.txt")
    setup = subprocess.run(["bash", str(server / "scripts" / "setup.sh")], capture_output=True, text=True,
                           env={**_offline_env(), "WHEELS": str(wheels)}, timeout=600, stdin=subprocess.DEVNULL)
    assert setup.returncode == 0 and (server / ".venv" / ".requirements.sha256").is_file(), setup.stderr[-3000:]
    imported = subprocess.run([str(server / ".venv" / "bin" / "python"), "-c",
                               "import antlr4, captioning, yaml; from captioning.params import Params; "
                               "print(*captioning.__path__)"], capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.strip() == str(server / "src" / "captioning")


def test_a_requirement_no_index_holds_is_refused_in_one_line(tmp_path):
    (tmp_path / "requirements.txt").write_text("no-such-package-anywhere==1.0\n")
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "wheels.py"), "--requirements",
                           str(tmp_path / "requirements.txt"), "--out", str(tmp_path / "wheels"),
                           "--find-links", str(tmp_path), "--index-url", (tmp_path / "index").as_uri()],
                          capture_output=True, text=True, env=_offline_env(), timeout=120, stdin=subprocess.DEVNULL)
    assert made.returncode == 1 and "Traceback" not in made.stderr
    [line] = made.stderr.strip().splitlines()
    assert line == "wheels: the requirements do not resolve: No matching distribution found for no-such-package-anywhere==1.0"
