"""Presets: a YAML file of params overrides, checked, turned into `dvc exp run -S` flags.

    dvc exp run -n seed-coco $(python -m captioning.presets presets/seed-coco.yaml)

The preset is merged onto params.yaml and parsed with the params schema before anything prints,
so a misspelt key or a bad value fails here, naming the key, not halfway through a GPU run.
`dvc exp run -S` only sets keys that params.yaml already has, which is checked too.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from captioning.params import Params, ParamsError, flatten, nest, parse_params

# Flags go through the shell's word splitting unquoted: values must be plain words.
_PLAIN = re.compile(r"^[A-Za-z0-9_.:/+-]+$")


def load_preset(path: str | Path, base: str | Path = "params.yaml") -> tuple[dict[str, object], Params]:
    """(flat `section.key` -> value overrides, the Params they give on top of `base`)."""
    path = Path(path)
    try:
        preset = yaml.safe_load(path.read_text()) or {}
        params = yaml.safe_load(Path(base).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ParamsError(f"{path}: cannot read the preset or {base} ({err})") from None
    flat = flatten(preset)
    merged = flatten(params)
    for key in flat:
        if key not in merged:
            try:  # a key the schema lacks gets its did-you-mean message from parse_params
                parse_params(nest({key: flat[key]}))
            except ParamsError as err:
                raise ParamsError(f"{path}: {err}") from None
            raise ParamsError(f"{path}: {key} is not in {base}; add it there first (dvc exp run -S only sets existing keys)")
        if isinstance(flat[key], str) and not _PLAIN.match(flat[key]):
            raise ParamsError(f"{path}: {key}={flat[key]!r} must be one plain word for a -S flag")
    merged.update(flat)
    try:
        return flat, parse_params(nest(merged))
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def flags(overrides: dict[str, object]) -> list[str]:
    return [f"-S {key}={_format(value)}" for key, value in overrides.items()]


def _format(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="YAML file of overrides, e.g. presets/seed-coco.yaml")
    parser.add_argument("--params", default="params.yaml", help="the params file the preset applies to")
    args = parser.parse_args(argv)
    try:
        overrides, _ = load_preset(args.preset, args.params)
    except ParamsError as err:
        sys.exit(f"preset: {err}")
    print(" ".join(flags(overrides)))


if __name__ == "__main__":
    main()
