"""Compare MLflow runs of the pipeline grouped by params: test scores as mean and spread over seeds.

    python bench/compare_runs.py --by model.decoder                 # every run in ./mlflow.db
    python bench/compare_runs.py --by model.decoder --where features.views=1

What `mlflow ui`'s compare view shows run by run, summed up per group: each pipeline run is one
MLflow run holding every param of params.yaml and the test scores evaluate logged, so runs that
differ only in `seed` form one group. Runs without test scores (still running, failed) are left out;
a param a run predates counts as its default today (what the code did before it was a knob).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

METRICS = ("bleu_4", "cider", "grounded", "strict")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--by", action="append", required=True, help="a param to group by (repeatable)")
    parser.add_argument("--where", action="append", default=[], help="PARAM=VALUE: only runs with that value")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS))
    args = parser.parse_args()

    import mlflow

    from captioning.params import Params, flatten
    from captioning.tracking import EXPERIMENT, experiment_id

    defaults = {k: str(v) for k, v in flatten(Params().to_dict()).items()}

    runs = mlflow.search_runs([experiment_id()], output_format="list", max_results=10_000)
    wanted = dict(w.split("=", 1) for w in args.where)
    groups: dict[tuple, list] = {}
    for run in runs:
        params, metrics = {**defaults, **run.data.params}, run.data.metrics
        if f"test_{args.metrics[0]}" not in metrics or any(params.get(k) != v for k, v in wanted.items()):
            continue
        groups.setdefault(tuple(params.get(k, "?") for k in args.by), []).append(run)
    print(f"MLflow experiment {EXPERIMENT}: {sum(map(len, groups.values()))} runs with test scores")
    header = [*args.by, "runs", "seeds", *(f"test_{m}" for m in args.metrics)]
    print(" | ".join(header))
    for key, members in sorted(groups.items()):
        cells = [*key, str(len(members)), ",".join(sorted({r.data.params.get("seed", "?") for r in members}, key=str))]
        for metric in args.metrics:
            values = [r.data.metrics[f"test_{metric}"] for r in members if f"test_{metric}" in r.data.metrics]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
