"""The model registry: every evaluated model is a version of one registered model
(`evaluate.registered_model`), and the alias `champion` marks the team's best.

The champion is chosen on validation, never on test: a new version takes the alias only when it
beats the champion on the validation score that picked its own epoch (`scst.select_metric` for
a self-critically trained checkpoint, else `train.select_metric`; val_loss for `last`). Each
version carries its validation scores as tags, so the comparison needs nothing but the registry,
and says what it compared.
"""

from __future__ import annotations

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from captioning import lineage
from captioning.errors import UserError
from captioning.metrics import val_key

CHAMPION = "champion"
KIND_TAG, KIND = "captioning.kind", "captioner"  # marks a registered model as one of ours


class RegistryError(UserError):
    pass


def check_name(client: MlflowClient, name: str, where: str) -> None:
    """Refuse a registered model of that name that holds another kind of model (before any work)."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return
        raise
    if model.tags.get(KIND_TAG) != KIND:
        raise RegistryError(f"evaluate.registered_model: {where} already has a registered model {name!r} that holds "
                            f"another kind of model (no tag {KIND_TAG}={KIND}): pick another name, e.g. "
                            f"dvc exp run -S evaluate.registered_model={name}-captioner")


def register(client: MlflowClient, name: str, model_uri: str, tags: dict[str, str]) -> ModelVersion:
    """A new version of `name` (created, and marked ours, on first use) for the logged model."""
    try:
        client.create_registered_model(name, tags={KIND_TAG: KIND},
                                       description="Image captioner (CNN encoder + LSTM decoder). @champion: "
                                                   "the best version by its validation score.")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return mlflow.register_model(model_uri, name, tags=tags)


def version_tags(validation: dict[str, float], run: mlflow.entities.Run, inputs: list[str]) -> dict[str, str]:
    """Where a version came from: its validation scores, the DVC experiment and git commit of
    `run` (the evaluation's), and the md5s that dvc.lock records for `inputs` (data and checkpoint)."""
    md5s = lineage.locked_md5s()
    held = run.data.tags
    return {**{k: str(v) for k, v in validation.items() if k.startswith("val_")},
            "dvc.exp_name": held.get("dvc.exp_name", "workspace"), "git.commit": held.get("git.commit", ""),
            "captioning.run_name": run.info.run_name,
            **{f"dvc.md5.{path}": md5s[path] for path in inputs if path in md5s}}


def register_and_promote(client: MlflowClient, name: str, model_uri: str, tags: dict[str, str],
                         select_metric: str) -> tuple[ModelVersion, str]:
    """`register`, then `promote`; the version keeps what the champion check said. Returns
    (version, what the check said)."""
    version = register(client, name, model_uri, tags)
    verdict = promote(client, name, version, select_metric)
    client.set_model_version_tag(name, version.version, "captioning.champion_check", verdict)
    return version, verdict


def selection_metric(select_metric: str) -> tuple[str, bool]:
    """(the validation score a version is compared on, lower is better)."""
    key = val_key("val_loss" if select_metric == "last" else select_metric)
    return key, key == "val_loss"


def promote(client: MlflowClient, name: str, version: ModelVersion, select_metric: str) -> str:
    """Give `version` the champion alias if it beats the champion on the validation score
    `select_metric` names; return one line saying what was compared and what happened.

    With no champion (the first version, or the champion's version was deleted, which removes its
    alias) the version is compared with the best other version holding that score.
    """
    key, lower = selection_metric(select_metric)
    mine = _score(version, key)
    label = f"{name} v{version.version}"
    if mine is None:
        return f"registry: {label} has no {key} to compare; @{CHAMPION} unchanged"
    champion = _champion(client, name)
    note = ""
    if champion is None:
        rivals = [v for v in client.search_model_versions(f"name = '{name}'")
                  if str(v.version) != str(version.version) and _score(v, key) is not None]
        if not rivals:
            client.set_registered_model_alias(name, CHAMPION, version.version)
            return f"registry: {label} ({key} {mine:.4f}) is the first to compare: @{CHAMPION} -> v{version.version}"
        champion = min(rivals, key=lambda v: _score(v, key) * (1 if lower else -1))
        note = f" (no @{CHAMPION}: compared with the best other version)"
    theirs = _score(champion, key)
    if theirs is None:
        return (f"registry: {label} ({key} {mine:.4f}): the champion v{champion.version} has no {key} to compare "
                f"with; @{CHAMPION} stays on v{champion.version}")
    better = mine < theirs if lower else mine > theirs
    winner = version if better else champion
    if better or note:
        client.set_registered_model_alias(name, CHAMPION, winner.version)
    verdict = f"beats v{champion.version} ({key} {theirs:.4f})" if better else \
        f"does not beat v{champion.version} ({key} {theirs:.4f})"
    moved = f"@{CHAMPION} -> v{winner.version}" if better or note else f"@{CHAMPION} stays on v{champion.version}"
    return f"registry: {label} ({key} {mine:.4f}) {verdict}{note}: {moved}"


def _champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _score(version: ModelVersion, key: str) -> float | None:
    try:
        return float(version.tags[key])
    except (KeyError, ValueError):
        return None
