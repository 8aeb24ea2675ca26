"""Download, on a connected machine, every wheel an offline server needs to install this project.

    python3 scripts/wheels.py --python 3.12 --platform manylinux_2_28_x86_64 --out wheels
    # carry wheels/ and a copy of the repo to the server, then there (no network):
    WHEELS=wheels bash scripts/setup.sh

Fetches the pinned requirements (requirements.txt pins every one exactly) with their dependencies,
as wheels for the server's Python and platform, plus the build requirements of pyproject.toml
(setup.sh installs the project itself from source). A package published only as source is built
here into a wheel, which must then be pure Python. Prints every wheel and the total size.

--platform is the server's newest tag: manylinux_2_28_x86_64 for a server with glibc 2.28
(`ldd --version` there); wheels for older glibc run there too and are taken as well. Default:
this machine's Python and platform. Needs only python3 with pip, no venv: run it from a clone.
See docs/offline.md.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The manylinux tags named by a year before PEP 600: the glibc minor version each stands for.
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


class BundleError(Exception):
    """A problem the user can fix: printed as one line."""


def norm(name: str) -> str:
    """A project name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    return norm(re.split(r"[\s\[=<>!~;@]", line.strip(), maxsplit=1)[0])


def read_requirements(path: Path) -> list[str]:
    """The requirement lines of a requirements file, comments dropped."""
    if not path.is_file():
        raise BundleError(f"{path}: no such requirements file")
    lines = [line.split(" #")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "-"))]


def build_requirements(pyproject: Path) -> list[str]:
    """[build-system] requires of the project: what installing it from source needs."""
    return list(tomllib.loads(pyproject.read_text()).get("build-system", {}).get("requires", []))


def platforms(tag: str) -> list[str]:
    """The server's platform tag and the older manylinux tags a server with it also runs."""
    legacy = {f"{name}_": minor for minor, name in LEGACY_MANYLINUX.items()}
    for prefix, minor in legacy.items():
        if tag.startswith(prefix):
            tag = f"manylinux_2_{minor}_{tag[len(prefix):]}"
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
    if not match:
        return [tag]
    newest, arch = int(match[1]), match[2]
    tags = []
    for minor in range(newest, 4, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in LEGACY_MANYLINUX:
            tags.append(f"{LEGACY_MANYLINUX[minor]}_{arch}")
    return tags


def this_platform() -> str:
    libc, version = platform.libc_ver()
    if libc != "glibc" or not version:
        raise BundleError("this machine is not a glibc Linux: pass the server's --platform "
                          "(e.g. manylinux_2_28_x86_64)")
    major, minor = version.split(".")[:2]
    return f"manylinux_{major}_{minor}_{platform.machine()}"


def target_options(python: str, platform_tag: str) -> list[str]:
    """pip's options for wheels that install on that Python (CPython) and platform."""
    if not re.fullmatch(r"3\.\d+", python):
        raise BundleError(f"--python {python}: expected a version like 3.12")
    options = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
               "--abi", f"cp{python.replace('.', '')}"]
    for tag in platforms(platform_tag):
        options += ["--platform", tag]
    return options


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True)


def build_pure_wheel(requirement: str, out: Path, sources: list[str]) -> Path:
    """A wheel built here from `requirement`'s source; refused unless pure Python (py3-none-any)."""
    with tempfile.TemporaryDirectory() as tmp:
        done = pip("wheel", "-q", "--no-deps", "--no-binary", requirement_name(requirement), *sources, "-w", tmp,
                   requirement)
        built = list(Path(tmp).glob("*.whl"))
        if done.returncode or not built:
            raise BundleError(f"{requirement}: no wheel for that Python and platform, and none could be built "
                              f"here: {last_error(done)}")
        if not built[0].name.endswith("-none-any.whl"):
            raise BundleError(f"{requirement}: no wheel for that Python and platform, and its source builds one "
                              f"for this machine only ({built[0].name}); --skip it if the server has it")
        return Path(shutil.copy2(built[0], out))


def last_error(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("ERROR:")] or done.stderr.splitlines()
    return " ".join(lines[-1:]).removeprefix("ERROR: ") or f"pip exited with {done.returncode}"


def source_only(requirements: list[str], sources: list[str]) -> list[str]:
    """`name==version` of each package that the requirements resolve to, on this machine, as a
    source archive: those publish no wheel, and pip cannot resolve them for another platform."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        done = pip("install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), *sources,
                   *requirements)
        if done.returncode:
            raise BundleError(f"the requirements do not resolve: {last_error(done)}")
        items = json.loads(report.read_text())["install"]
    return [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in items
            if not item["download_info"]["url"].endswith(".whl")]


def download(requirements: list[str], out: Path, target: list[str], sources: list[str]) -> list[str]:
    """Resolve and download `requirements` and their dependencies into `out`, for the target.
    Packages published as source only are built here first (pure-Python wheels, which pip then
    finds in `out`). Returns those built."""
    built = source_only(requirements, sources)
    for requirement in built:
        print(f"{requirement}: no wheel published; building it here", flush=True)
        build_pure_wheel(requirement, out, sources)
    while True:
        done = pip("download", "-q", *target, *sources, "--find-links", str(out), "-d", str(out), *requirements)
        if done.returncode == 0:
            return built
        # One that has wheels for this machine but not for the target: built if its source is pure.
        missing = re.findall(r"No matching distribution found for (\S+)", done.stderr)
        if not missing or missing[0] in built:
            raise BundleError(last_error(done))
        print(f"{missing[0]}: no wheel for that Python and platform; building it here", flush=True)
        build_pure_wheel(missing[0], out, sources)
        built.append(missing[0])


def slim_scorer(out: Path) -> Path:
    """Replace the pycocoevalcap wheel in `out` by its Python code alone, version `<v>+slim`: BLEU,
    ROUGE-L and CIDEr, without the Java tokenizer, METEOR and SPICE (jars and METEOR's paraphrase
    table). `pycocoevalcap==<v>` still matches it."""
    found = list(out.glob("pycocoevalcap-*.whl"))
    if not found:
        raise BundleError("--slim-scorer: pycocoevalcap is not among the requirements")
    source = found[0]
    version = source.name.split("-")[1]
    old, new = f"pycocoevalcap-{version}.dist-info", f"pycocoevalcap-{version}+slim.dist-info"
    target = out / f"pycocoevalcap-{version}+slim-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.endswith((".jar", ".gz", "RECORD")) or "/spice/" in item.filename:
                continue
            name, data = item.filename.replace(old, new), src.read(item)
            if name.endswith("METADATA"):
                data = data.replace(f"Version: {version}\n".encode(), f"Version: {version}+slim\n".encode())
            dst.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        dst.writestr(f"{new}/RECORD", "\n".join([*record, f"{new}/RECORD,,"]) + "\n")
    source.unlink()
    return target


def bundle(requirements: list[str], out: Path, python: str, platform_tag: str, skip: set[str],
           slim: bool, sources: list[str]) -> list[str]:
    """Fill `out` with the wheels; returns the requirements built here from source."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.whl"):
        stale.unlink()
    wanted = [r for r in requirements if requirement_name(r) not in skip]
    built = download(wanted, out, target_options(python, platform_tag), sources)
    # A skipped package that a kept one depends on was downloaded with it: the server has it.
    for path in out.glob("*.whl"):
        if norm(path.name.split("-")[0]) in skip:
            path.unlink()
    if slim:
        slim_scorer(out)
    return built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/wheels.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the server's Python version, e.g. 3.12 (default: this one's)")
    parser.add_argument("--platform", help="the server's platform tag, e.g. manylinux_2_28_x86_64 "
                                           "(default: this machine's)")
    parser.add_argument("--out", type=Path, default=REPO / "wheels", help="the folder to fill (its wheels are "
                                                                          "replaced; default: wheels/)")
    parser.add_argument("--requirements", type=Path, default=REPO / "requirements.txt")
    parser.add_argument("--skip", default="", help="packages the server's Python has already, comma-separated "
                                                   "(e.g. torch,torchvision): not fetched")
    parser.add_argument("--slim-scorer", action="store_true",
                        help="pycocoevalcap without its Java parts: smaller, but the evaluate stage cannot score "
                             "there (training's BLEU and CIDEr still work); for a server whose captions are "
                             "scored on another machine")
    parser.add_argument("--index-url", help="where pip looks for packages (default: pip's configuration)")
    parser.add_argument("--find-links", action="append", default=[], help="a folder of wheels to look in too")
    args = parser.parse_args(argv)
    sources = ([f"--index-url={args.index_url}"] if args.index_url else []) + [
        f"--find-links={folder}" for folder in args.find_links]
    skip = {norm(name) for name in args.skip.split(",") if name.strip()}
    try:
        platform_tag = args.platform or this_platform()
        requirements = read_requirements(args.requirements) + build_requirements(REPO / "pyproject.toml")
        if unknown := skip - {requirement_name(r) for r in requirements}:
            print(f"note: --skip {', '.join(sorted(unknown))}: not a direct requirement; dropped from the bundle if a "
                  "requirement pulls it in", flush=True)
        built = bundle(requirements, args.out, args.python, platform_tag, skip, args.slim_scorer, sources)
    except BundleError as err:
        sys.exit(f"wheels: {' '.join(str(err).split())}")
    wheels = sorted(args.out.glob("*.whl"), key=lambda p: (-p.stat().st_size, p.name))
    for path in wheels:
        print(f"{path.stat().st_size / 2**20:8.1f} MiB  {path.name}")
    total = sum(p.stat().st_size for p in wheels)
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.out}, for CPython {args.python} on {platform_tag}"
          + (f" (built here: {', '.join(built)})" if built else ""))


if __name__ == "__main__":
    main()
