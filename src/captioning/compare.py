"""`caption-compare`: MLflow runs of the pipeline grouped by params, test scores as mean and spread.

    caption-compare --by model.decoder                        # every run in ./mlflow.db
    caption-compare --by model.decoder --where features.views=1
    python -m captioning.compare --by data.num_train          # the same, without the console script

What `mlflow ui`'s compare view shows run by run, summed up per group: each pipeline run is one
MLflow run holding every param of params.yaml and the test scores evaluate logged, and runs that
differ only in `seed` form one group, a row named by the `--by` values. Groups that share those
values but differ in another param get a row each, with a last column naming what sets them apart
(`data.num_test=300`), so no row mixes settings. A seed run again with the same params counts once,
as its newest run. Runs without test scores (still running, failed) are left out; a param a run
predates counts as its default today (what the code did before it was a knob). The store is the
project's (`MLFLOW_TRACKING_URI`, else mlflow.db in the current folder).
"""

from __future__ import annotations

import argparse
import difflib
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from captioning.errors import UserError

METRICS = ("bleu_4", "cider", "grounded", "strict")


@dataclass(frozen=True)
class Run:
    """What a comparison reads of one MLflow run."""

    params: Mapping[str, str]
    metrics: Mapping[str, float]
    started: int = 0  # start time, ms: the newest run of a setting and seed is the one counted


@dataclass(frozen=True)
class Group:
    """Runs that share every param but `seed`, one a seed; `key` holds the values of the params
    grouped by, `differs` what sets the group apart from others with the same key."""

    key: tuple[str, ...]
    runs: tuple[Run, ...]
    differs: tuple[str, ...] = ()

    def seeds(self) -> list[str]:
        return sorted({run.params.get("seed", "?") for run in self.runs}, key=str)

    def score(self, metric: str) -> tuple[float, float] | None:
        """(mean, sample standard deviation) of `test_<metric>` over the group's runs; None if no
        run logged it. One run has no spread: 0."""
        values = [run.metrics[f"test_{metric}"] for run in self.runs if f"test_{metric}" in run.metrics]
        if not values:
            return None
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def parse_where(conditions: Iterable[str]) -> dict[str, str]:
    """["features.views=1", ...] -> {"features.views": "1", ...}."""
    wanted = {}
    for condition in conditions:
        key, sep, value = condition.partition("=")
        if not sep or not key:
            raise UserError(f"--where {condition}: expected PARAM=VALUE, e.g. --where model.decoder=attention")
        wanted[key] = value
    return wanted


def group_runs(runs: Iterable[Run], by: list[str], where: Mapping[str, str], defaults: Mapping[str, str],
               first_metric: str) -> list[Group]:
    """Runs that logged `test_<first_metric>` and match `where`, one group per setting (every
    param but `seed`), sorted by the values of `by`. A param a run lacks takes its value from
    `defaults`; a param in neither the defaults nor any run is a misspelt name and refused."""
    runs = list(runs)
    known = set(defaults).union(*(run.params for run in runs))
    for name in [*by, *where]:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else " (see params.yaml for the names)"
            raise UserError(f"no param {name}{hint}")
    settings: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], dict[str, Run]] = {}
    for run in runs:
        params = {**defaults, **run.params}
        if f"test_{first_metric}" not in run.metrics or any(params.get(k) != v for k, v in where.items()):
            continue
        key = tuple(params.get(k, "?") for k in by)
        setting = tuple(sorted((k, v) for k, v in params.items() if k != "seed"))
        by_seed = settings.setdefault((key, setting), {})
        seed = params.get("seed", "?")
        if seed not in by_seed or run.started > by_seed[seed].started:
            by_seed[seed] = Run(params, run.metrics, run.started)
    rows: dict[tuple[str, ...], list[tuple[dict[str, str], tuple[Run, ...]]]] = {}
    for (key, setting), by_seed in settings.items():
        rows.setdefault(key, []).append((dict(setting), tuple(by_seed.values())))
    groups = []
    for key, members in sorted(rows.items()):
        names = sorted(set().union(*(params for params, _ in members)))
        apart = [k for k in names if len({params.get(k) for params, _ in members}) > 1]
        for params, kept in sorted(members, key=lambda m: [m[0].get(k, "") for k in apart]):
            groups.append(Group(key, kept, tuple(f"{k}={params.get(k, '?')}" for k in apart)))
    return groups


def table(groups: list[Group], by: list[str], metrics: list[str]) -> list[str]:
    """The groups as ` | `-separated lines, a header first: params, runs, seeds, `mean ± spread`, and
    the params that set a row apart when any row shares its `by` values with another."""
    apart = any(group.differs for group in groups)
    lines = [" | ".join([*by, "runs", "seeds", *(f"test_{m}" for m in metrics), *(["differs in"] if apart else [])])]
    for group in groups:
        cells = [*group.key, str(len(group.runs)), ",".join(group.seeds())]
        for metric in metrics:
            score = group.score(metric)
            cells.append("-" if score is None else f"{score[0]:.3f} ± {score[1]:.3f}")
        lines.append(" | ".join(cells + ([" ".join(group.differs) or "-"] if apart else [])))
    return lines


def read_runs(experiment: str) -> list[Run]:
    """Every run of the project's MLflow experiment. A local store that does not exist yet is
    refused rather than created: there would be nothing to compare."""
    import mlflow

    from captioning.tracking import experiment_id, tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"{uri.removeprefix('sqlite:///')}: no MLflow store; run the pipeline first (dvc repro), "
                        "run this from the repo's folder, or set MLFLOW_TRACKING_URI")
    found = mlflow.search_runs([experiment_id(experiment)], output_format="list", max_results=10_000)
    return [Run(run.data.params, run.data.metrics, run.info.start_time) for run in found]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="caption-compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--by", action="append", required=True, help="a param to group by (repeatable)")
    parser.add_argument("--where", action="append", default=[], help="PARAM=VALUE: only runs with that value")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS),
                        help="test scores to show (without `test_`); runs lacking the first are left out")
    args = parser.parse_args(argv)

    from captioning.params import Params, flatten
    from captioning.tracking import EXPERIMENT

    try:
        where = parse_where(args.where)
        defaults = {k: str(v) for k, v in flatten(Params().to_dict()).items()}
        groups = group_runs(read_runs(EXPERIMENT), args.by, where, defaults, args.metrics[0])
    except UserError as err:
        raise SystemExit(f"caption-compare: {' '.join(str(err).split())}") from None
    print(f"MLflow experiment {EXPERIMENT}: {sum(len(g.runs) for g in groups)} runs with test scores")
    print("\n".join(table(groups, args.by, args.metrics)))


if __name__ == "__main__":
    main()
