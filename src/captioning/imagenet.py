"""The backbone's ImageNet weights (`model.pretrained: true`), found or fetched, and verified.

torchvision names each weights file with the first hex digits of its sha256
(`resnet18-f37072fd.pth`); torch.hub checks a download against that prefix, and so do we. Where
the file comes from, in this order:
1. `model.weights_path`, a file in `inputs/model/` (no network);
2. the torch hub cache (`$TORCH_HOME/hub/checkpoints`), where torchvision keeps the files it
   downloads (no network);
3. a download into that cache, by the archives' machinery (`download.fetch`): resumable, verified,
   from `data.base_url` when it names a mirror (the file under its own name; `data.checksums` may
   give a mirror's own copy its size and sha256), else torchvision's address.

The weights stage records the file (`models/imagenet.json`: its name and full sha256, never a
machine's path); pretrain finds the same file again and checks it against that record
(`backbone.recorded_weights`), without this module's network code.
"""

from __future__ import annotations

import re
from pathlib import Path

from captioning.backbone import WeightsError, hub_checkpoints
from captioning.download import Archive, DownloadError, fetch
from captioning.io import file_digest, write_json_atomic
from captioning.params import ParamsError


def archive(backbone: str, version: str, table: dict[str, Archive] | None = None) -> Archive:
    """The weights file torchvision publishes for `backbone` and `version` (DEFAULT, IMAGENET1K_V1...),
    or a mirror's own entry for that file name in `table`."""
    import torchvision

    versions = torchvision.models.get_model_weights(backbone)
    try:
        weights = versions[version]
    except KeyError:
        names = ", ".join(versions.__members__)
        raise ParamsError(f"model.weights_version {version} is not one of {backbone}'s: {names}") from None
    name = weights.url.rsplit("/", 1)[1]
    if table and name in table:  # a mirror's own copy (data.checksums)
        return Archive(name, weights.url, table[name].size, table[name].checksum)
    prefix = re.search(r"-([0-9a-f]{8,})\.", name)
    if prefix is None:  # every torchvision ResNet file carries one; refuse rather than trust blindly
        raise WeightsError(f"{name}: no sha256 prefix in torchvision's file name to verify it by")
    return Archive(name, weights.url, None, f"sha256:{prefix.group(1)}")


def obtain(backbone: str, version: str, weights_path: str, base_url: str,
           table: dict[str, Archive] | None = None) -> tuple[Path, str]:
    """(the weights file, where it came from): model.weights_path, the hub cache, or a download."""
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise WeightsError(f"model.weights_path: no file at {path}")
        return path, "model.weights_path"
    wanted = archive(backbone, version, table)
    cached = hub_checkpoints() / wanted.name
    if cached.is_file():
        if not wanted.matches(file_digest(cached)):
            raise WeightsError(f"{cached}: its sha256 does not start with {wanted.digest}, as its name says: a "
                               "corrupt or foreign file; delete it and run the stage again to fetch it")
        return cached, "the torch hub cache"
    url = f"{base_url.rstrip('/')}/{wanted.name}" if base_url else wanted.url
    try:
        return fetch(wanted, hub_checkpoints(), base_url=base_url), url
    except DownloadError as err:
        raise DownloadError(f"{err}. Without network, copy {wanted.name} into {hub_checkpoints()} or into "
                            "inputs/model/ (and set model.weights_path to it)") from None


def record(out: str | Path, backbone: str, version: str, weights_path: str, path: Path | None) -> None:
    """What the weights stage writes: enough to find and check the same file, on any machine."""
    if path is None:
        write_json_atomic(out, {"pretrained": False})
        return
    write_json_atomic(out, {"pretrained": True, "backbone": backbone, "version": version,
                            "weights_path": weights_path, "file": path.name, "sha256": file_digest(path)})
