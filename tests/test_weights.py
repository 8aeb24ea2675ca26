"""ImageNet weights: a local file or the hub cache is used without network, a download comes from a
mirror (a loopback server here) verified and resumable, and a wrong file is refused, naming why."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch

from captioning import imagenet
from captioning.backbone import WeightsError, hub_checkpoints, load_weights, recorded_weights, resnet
from captioning.download import Archive, DownloadError, fetch
from captioning.params import ParamsError
from test_sources import Loopback

NAME = "resnet18-f37072fd.pth"  # torchvision's file for resnet18 DEFAULT (= IMAGENET1K_V1)
NOWHERE = "http://127.0.0.1:9/"  # nothing listens: any attempt to use the network fails


def weights_bytes(arch: str = "resnet18", seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save(resnet(arch).state_dict(), buf)
    return buf.getvalue()


def own_copy(body: bytes) -> dict[str, Archive]:
    """A mirror's table entry for its own copy (what data.checksums gives)."""
    return {NAME: Archive(NAME, "", len(body), "sha256:" + hashlib.sha256(body).hexdigest())}


@pytest.fixture(autouse=True)
def _empty_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_the_file_named_is_torchvisions_and_versions_are_checked():
    archive = imagenet.archive("resnet18", "DEFAULT")
    assert archive.name == NAME and archive.size is None and archive.checksum == "sha256:f37072fd"
    assert archive.url.startswith("https://download.pytorch.org/models/")
    assert imagenet.archive("resnet50", "IMAGENET1K_V1").name != imagenet.archive("resnet50", "IMAGENET1K_V2").name
    with pytest.raises(ParamsError, match=r"model\.weights_version IMAGENET1K_V2 is not one of resnet18's: IMAGENET1K_V1"):
        imagenet.archive("resnet18", "IMAGENET1K_V2")


def test_weights_path_is_used_without_network(tmp_path):
    path = tmp_path / "mine.pth"
    path.write_bytes(weights_bytes())
    found, origin = imagenet.obtain("resnet18", "DEFAULT", str(path), NOWHERE)
    assert (found, origin) == (path, "model.weights_path")
    with pytest.raises(WeightsError, match="model.weights_path: no file at"):
        imagenet.obtain("resnet18", "DEFAULT", str(tmp_path / "none.pth"), NOWHERE)


def test_the_hub_cache_is_used_without_network_and_checked():
    body = weights_bytes()
    hub_checkpoints().mkdir(parents=True)
    (hub_checkpoints() / NAME).write_bytes(body)
    found, origin = imagenet.obtain("resnet18", "DEFAULT", "", NOWHERE, own_copy(body))
    assert found == hub_checkpoints() / NAME and origin == "the torch hub cache"
    # Without the mirror's table the name's sha256 prefix applies: this file is not torchvision's
    with pytest.raises(WeightsError, match="sha256 does not start with f37072fd.*delete it"):
        imagenet.obtain("resnet18", "DEFAULT", "", NOWHERE)


def test_a_mirror_serves_the_download_resumed_after_a_cut_and_verified():
    body = weights_bytes()
    server = Loopback({NAME: body})
    try:
        server.cut_after[NAME] = len(body) // 2
        found, origin = imagenet.obtain("resnet18", "DEFAULT", "", server.url, own_copy(body))
        assert found == hub_checkpoints() / NAME and found.read_bytes() == body
        assert origin == f"{server.url}{NAME}"
        assert server.ranges[-1] == f"bytes={len(body) // 2}-"  # resumed, not fetched again
        assert server.served[NAME] == len(body)
        assert not list(hub_checkpoints().glob("*.part"))
    finally:
        server.close()


def test_a_download_is_verified_by_the_sha256_prefix_in_its_name(tmp_path):
    """What torchvision publishes: no size, a sha256 prefix in the file name (as torch.hub checks)."""
    body = weights_bytes()
    prefix = hashlib.sha256(body).hexdigest()[:8]
    server = Loopback({f"resnet18-{prefix}.pth": body, "resnet18-00000000.pth": body})
    try:
        good = Archive(f"resnet18-{prefix}.pth", "", None, f"sha256:{prefix}")
        assert fetch(good, tmp_path, base_url=server.url).read_bytes() == body
        bad = Archive("resnet18-00000000.pth", "", None, "sha256:00000000")
        with pytest.raises(DownloadError, match="checksum mismatch.*deleted"):
            fetch(bad, tmp_path, base_url=server.url)
        assert not (tmp_path / bad.name).exists() and not (tmp_path / f"{bad.name}.part").exists()
    finally:
        server.close()


def test_offline_says_what_to_do_in_one_line():
    with pytest.raises(DownloadError) as caught:
        imagenet.obtain("resnet18", "DEFAULT", "", "http://weights.invalid/")
    message = str(caught.value)
    assert "\n" not in message and "cannot resolve weights.invalid" in message
    assert f"copy {NAME} into" in message and "model.weights_path" in message


def test_a_file_of_another_architecture_is_refused_naming_both(tmp_path):
    path = tmp_path / "resnet34.pth"
    path.write_bytes(weights_bytes("resnet34"))
    with pytest.raises(WeightsError, match=r"holds resnet34 weights, but model\.backbone is resnet18"):
        load_weights(path, "resnet18")
    (tmp_path / "other.pth").write_bytes(b"not a weights file")
    with pytest.raises(WeightsError, match="not a PyTorch weights file"):
        load_weights(tmp_path / "other.pth", "resnet18")


def test_pretrain_checks_the_recorded_file(tmp_path):
    path = tmp_path / "mine.pth"
    path.write_bytes(weights_bytes())
    imagenet.record(tmp_path / "imagenet.json", "resnet18", "DEFAULT", str(path), path)
    record = json.loads((tmp_path / "imagenet.json").read_text())
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and record["file"] == "mine.pth"
    state = recorded_weights(tmp_path / "imagenet.json", "resnet18")
    assert torch.equal(state["conv1.weight"], torch.load(path, weights_only=True)["conv1.weight"])
    path.write_bytes(weights_bytes(seed=1))  # changed behind DVC's back
    with pytest.raises(WeightsError, match=r"changed since the weights stage.*dvc repro -f weights"):
        recorded_weights(tmp_path / "imagenet.json", "resnet18")
    imagenet.record(tmp_path / "none.json", "resnet18", "DEFAULT", "", None)
    assert recorded_weights(tmp_path / "none.json", "resnet18") is None
