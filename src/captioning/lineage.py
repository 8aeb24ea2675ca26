"""What a pipeline run did, read back for its MLflow run: which stages ran in it and for how long,
and the DVC md5s of the data and models it used.

A pipeline run is one `dvc repro` or `dvc exp run` (or one queued experiment): DVC starts every
stage as a child of that one process, so the nearest `dvc` process above a stage names the
pipeline run. `stage.run_stage` records each stage's time under `<workspace>/tmp/stages/`,
labelled with that name; a later stage of the same pipeline run then tells a stage that ran from
one DVC skipped or restored from its cache. The md5s come from `dvc.lock`, which DVC updates after
each stage, so a stage sees those of every stage before it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import yaml

from captioning.io import write_json_atomic


def pipeline_run() -> str:
    """The pipeline run this process belongs to: the nearest `dvc` process above it (its pid and
    start time), else this process itself (a stage run by hand is a pipeline run of its own)."""
    me = psutil.Process()
    for process in [*me.parents(), me]:
        try:
            if _is_dvc(process.cmdline()) or process.pid == me.pid:
                return f"{process.pid}-{int(process.create_time() * 1000)}"
        except psutil.Error:  # gone, or another user's
            continue
    return f"{me.pid}-{int(me.create_time() * 1000)}"


def _is_dvc(cmdline: list[str]) -> bool:
    """`dvc ...` (its console script, run directly or by Python) or `python -m dvc ...`."""
    head = cmdline[:2]
    return any(Path(arg).name == "dvc" for arg in head) or cmdline[1:3] == ["-m", "dvc"]


def workspace() -> Path:
    """The DVC workspace the stage runs in (a queued experiment's own temporary copy included)."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


def record_stage(seconds: float) -> None:
    """Record the time of the stage DVC is running (a stage run by hand records nothing)."""
    stage = os.environ.get("DVC_STAGE")
    if stage:
        write_json_atomic(workspace() / "tmp" / "stages" / f"{stage}.json",
                          {"pipeline_run": pipeline_run(), "seconds": round(seconds, 1),
                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def stage_times(before: str | None = None, root: Path | None = None) -> dict[str, float | None]:
    """Every stage of `dvc.yaml` (those before `before`, if given), in its order: seconds if it ran
    in this pipeline run, None if DVC skipped it or restored it from its cache."""
    root = root or workspace()
    stages = list(_yaml(root / "dvc.yaml").get("stages", {}))
    if before in stages:
        stages = stages[:stages.index(before)]
    here, times = pipeline_run(), {}
    for stage in stages:
        record = root / "tmp" / "stages" / f"{stage}.json"
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):
            saved = {}
        times[stage] = saved["seconds"] if saved.get("pipeline_run") == here else None
    return times


def locked_md5s(root: Path | None = None) -> dict[str, str]:
    """{output path: md5} of every stage output in `dvc.lock` (a folder's md5 ends in `.dir`)."""
    lock = _yaml((root or workspace()) / "dvc.lock")
    return {out["path"]: out["md5"] for stage in lock.get("stages", {}).values()
            for out in stage.get("outs", []) if "md5" in out}


def locked_params(stage: str, root: Path | None = None) -> dict:
    """The params `dvc.lock` records for `stage` (those of params.yaml), or {} if it has none yet."""
    entry = _yaml((root or workspace()) / "dvc.lock").get("stages", {}).get(stage, {})
    return entry.get("params", {}).get("params.yaml", {})


def _yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except OSError:
        return {}
