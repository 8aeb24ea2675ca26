"""caption-compare on a real MLflow SQLite store: runs grouped by params, mean and spread over seeds."""

from __future__ import annotations

import subprocess

import mlflow
from mlflow.tracking import MlflowClient
import pytest

from captioning.compare import main
from captioning.tracking import experiment_id
from conftest import venv_env


def _log(params: dict, metrics: dict) -> None:
    with mlflow.start_run(experiment_id=experiment_id()):
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)


@pytest.fixture
def store():
    for seed, bleu in ((1, 0.20), (2, 0.30)):
        _log({"model.decoder": "attention", "seed": seed}, {"test_bleu_4": bleu, "test_cider": 1.0})
    _log({"model.decoder": "lstm", "seed": 1}, {"test_bleu_4": 0.10})  # no CIDEr logged
    _log({"model.decoder": "lstm", "seed": 2}, {"val_loss": 2.0})  # no test scores: still running
    _log({"seed": 3}, {"test_bleu_4": 0.40})  # predates model.decoder: its default today


def test_runs_group_by_param_with_mean_and_spread_over_seeds(store, capsys):
    main(["--by", "model.decoder", "--metrics", "bleu_4", "cider"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "MLflow experiment captioning: 4 runs with test scores"
    assert lines[1] == "model.decoder | runs | seeds | test_bleu_4 | test_cider"
    assert lines[2] == "attention | 2 | 1,2 | 0.250 ± 0.071 | 1.000 ± 0.000"
    assert lines[3] == "lstm | 2 | 1,3 | 0.250 ± 0.212 | -"  # seed 3 counts as the default decoder
    assert len(lines) == 4


def test_where_keeps_only_runs_with_that_value(store, capsys):
    main(["--by", "seed", "--where", "model.decoder=attention", "--metrics", "bleu_4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == ["1 | 1 | 1 | 0.200 ± 0.000", "2 | 1 | 2 | 0.300 ± 0.000"]


def test_user_mistakes_are_one_line(store, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"^caption-compare: no param model\.decodr; did you mean model\.decoder"):
        main(["--by", "model.decodr"])
    with pytest.raises(SystemExit, match=r"^caption-compare: --where model\.decoder: expected PARAM=VALUE"):
        main(["--by", "seed", "--where", "model.decoder"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}")
    with pytest.raises(SystemExit, match=r"mlflow\.db: no MLflow store; run the pipeline first"):
        main(["--by", "seed"])
    assert not (tmp_path / "elsewhere").exists()  # nothing created


def test_console_script_reports_a_misspelt_param_without_a_traceback(store):
    done = subprocess.run(["caption-compare", "--by", "model.decodr"], env=venv_env(),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("caption-compare: no param model.decodr; did you mean model.decoder")


def test_settings_that_differ_beyond_the_grouped_params_get_a_row_each(store, capsys):
    client = MlflowClient()
    for start, bleu, num_test in ((10, 0.50, "300"), (30, 0.60, "2000"), (20, 0.90, "2000")):
        run = client.create_run(experiment_id(), start_time=start)
        for key, value in {"model.decoder": "attention", "seed": 7, "data.num_test": num_test}.items():
            client.log_param(run.info.run_id, key, value)
        client.log_metric(run.info.run_id, "test_bleu_4", bleu)
        client.set_terminated(run.info.run_id)
    main(["--by", "model.decoder", "--where", "model.decoder=attention", "--metrics", "bleu_4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "MLflow experiment captioning: 4 runs with test scores"  # seed 7 at 2000 counts once
    assert lines[1] == "model.decoder | runs | seeds | test_bleu_4 | differs in"
    # data.num_test 2000 is the default the store fixture's runs predate; the newest run of a seed
    # counts, not its best.
    assert lines[2:] == ["attention | 3 | 1,2,7 | 0.367 ± 0.208 | data.num_test=2000",
                         "attention | 1 | 7 | 0.500 ± 0.000 | data.num_test=300"]
