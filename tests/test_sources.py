"""Real sources against a real HTTP server on 127.0.0.1 serving tiny archives laid out exactly
like the official ones (same names, same folders inside)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import shutil
import stat
import subprocess
import threading
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from PIL import Image

from captioning import sources
from captioning.download import Archive, DownloadError, fetch, safe_extract
from captioning.errors import UserError
from captioning.io import atomic_path
from captioning.layout import DatasetError, SPLITS, read_split
from captioning.params import DataParams, ParamsError
from captioning.presets import flags, load_preset
from conftest import REPO

TRAIN_IDS = (9, 25, 30, 34)  # in train2014.zip
VAL_IDS = (42, 73, 74, 133, 136, 139)  # in val2014.zip
KARPATHY = {42: "val", 73: "test", 74: "restval", 133: "val", 136: "test", 139: "restval"}


class Loopback:
    """A ThreadingHTTPServer on 127.0.0.1 serving `files`, with Range, cuts, failures and byte counts."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.served: Counter = Counter()  # body bytes sent per file
        self.cut_after: dict[str, int] = {}  # one-shot: close after this many body bytes
        self.fail: Counter = Counter()  # answer 503 this many times first
        self.ignore_range = False
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.ranges.append(self.headers.get("Range"))
                if server.fail[name] > 0:
                    server.fail[name] -= 1
                    self.send_error(503)
                    return
                if name not in server.files:
                    self.send_error(404)
                    return
                body, start = server.files[name], 0
                wanted = self.headers.get("Range")
                if wanted and not server.ignore_range:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                chunk = body[start:]
                if name in server.cut_after:
                    chunk = chunk[: server.cut_after.pop(name)]
                    self.close_connection = True
                self.wfile.write(chunk)
                server.served[name] += len(chunk)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def table(self) -> dict[str, Archive]:
        """The archive table for what this server holds (the real table's names and URLs)."""
        table = dict(sources.ARCHIVES)
        for name, body in self.files.items():
            table[name] = Archive(name, sources.ARCHIVES[name].url, len(body), "md5:" + hashlib.md5(body).hexdigest())
        return table

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def jpeg(colour, size=(48, 36)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def coco_archives(bad_train_image: bool = False) -> dict[str, bytes]:
    """train2014.zip, val2014.zip, annotations_trainval2014.zip, caption_datasets.zip in miniature."""
    def name(stem, i):
        return f"COCO_{stem}_{i:012d}.jpg"

    train = {f"train2014/{name('train2014', i)}": jpeg((20 * n, 40, 200)) for n, i in enumerate(TRAIN_IDS)}
    if bad_train_image:
        path = f"train2014/{name('train2014', TRAIN_IDS[-1])}"
        train[path] = train[path][:80]  # truncated JPEG inside the archive
    val = {f"val2014/{name('val2014', i)}": jpeg((200, 20 * n, 40)) for n, i in enumerate(VAL_IDS)}

    def captions(stem, ids, colour):
        return json.dumps({
            "info": {"description": "tiny"}, "licenses": [],
            "images": [{"id": i, "file_name": name(stem, i), "width": 48, "height": 36} for i in ids],
            "annotations": [{"id": 10 * i + k, "image_id": i, "caption": f"a {colour} photo number {k}"}
                            for i in ids for k in range(2)]}).encode()

    annotations = {"annotations/captions_train2014.json": captions("train2014", TRAIN_IDS, "blue"),
                   "annotations/captions_val2014.json": captions("val2014", VAL_IDS, "red"),
                   "annotations/instances_train2014.json": b"{}"}
    karpathy = [{"filepath": "train2014", "filename": name("train2014", i), "cocoid": i, "imgid": n,
                 "split": "train", "sentences": [{"raw": "Karpathy copy", "tokens": []}]}
                for n, i in enumerate(TRAIN_IDS)]
    karpathy += [{"filepath": "val2014", "filename": name("val2014", i), "cocoid": i, "imgid": 10 + n,
                  "split": KARPATHY[i], "sentences": [{"raw": "Karpathy copy", "tokens": []}]}
                 for n, i in enumerate(VAL_IDS)]
    flickr = [{"filename": f"{1000 + n}.jpg", "imgid": n, "split": s, "sentences": [{"raw": f"a dog number {n} "}]}
              for n, s in enumerate(("train", "train", "val", "test"))]
    datasets_zip = {"dataset_coco.json": json.dumps({"images": karpathy, "dataset": "coco"}).encode(),
                    "dataset_flickr8k.json": json.dumps({"images": flickr, "dataset": "flickr8k"}).encode(),
                    "dataset_flickr30k.json": json.dumps({"images": flickr, "dataset": "flickr30k"}).encode()}
    return {"train2014.zip": zip_bytes(train), "val2014.zip": zip_bytes(val),
            "annotations_trainval2014.zip": zip_bytes(annotations), "caption_datasets.zip": zip_bytes(datasets_zip)}


@pytest.fixture
def server():
    loop = Loopback(coco_archives())
    yield loop
    loop.close()


def stage(name: str):
    """A stage script as a module, so its main() runs in-process (fast, and its code is covered)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_params(path: Path, **data) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(data)
    raw["resize"].update(side=32, workers=1)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_coco2014_download_karpathy_split_vocab_resize(tmp_path, monkeypatch):
    loop = Loopback(coco_archives(bad_train_image=True))
    monkeypatch.chdir(tmp_path)
    params = DataParams(source="coco2014", base_url=loop.url)
    dataset = sources.build(params, 0, "data/downloads", table=loop.table())
    with atomic_path("data/raw") as tmp:
        sources.write(tmp, dataset)
    sizes = {s: len(dataset.splits[s][0]) for s in SPLITS}
    assert sizes == {"train": 6, "val": 2, "test": 2}  # 4 train2014 + 2 restval
    train = read_split("data/raw", "train")
    assert train.images[0]["file_name"] == "train2014/COCO_train2014_000000000009.jpg"
    assert train.captions[9] == ["a blue photo number 0", "a blue photo number 1"]  # official captions
    assert [r["id"] for r in read_split("data/raw", "test").images] == [73, 136]
    assert all(train.image_path(r).is_file() for r in train.images)
    link = Path("data/raw/train/images/train2014")
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))  # relative: the clone can move
    downloads = sorted(p.name for p in Path("data/downloads").iterdir())
    assert not [d for d in downloads if d.endswith((".zip", ".part"))]  # zips deleted once extracted
    assert not list(Path("data/downloads").rglob("instances_*.json"))  # only the captions files kept
    source = json.loads(Path("data/raw/source.json").read_text())
    assert source["archives"]["train2014.zip"] == loop.table()["train2014.zip"].checksum

    served = sum(loop.served.values())
    sources.build(params, 0, "data/downloads", table=loop.table())
    assert sum(loop.served.values()) == served  # a second run fetches nothing

    # The truncated JPEG from the archive: stops resize under the default policy, naming it...
    params_path = write_params(tmp_path / "params.yaml", source="coco2014", base_url=loop.url)
    with pytest.raises(UserError, match=r"(?s)COCO_train2014_000000000034\.jpg: truncated or corrupt.*on_bad_image: skip"):
        stage("resize").main(str(params_path), "data/raw", "data/resized")
    assert not Path("data/resized/train").exists()  # the split it stopped in is not left half-written
    # ... and is skipped and reported under skip; vocab reads what resize kept.
    params_path = write_params(tmp_path / "params.yaml", source="coco2014", on_bad_image="skip")
    stage("resize").main(str(params_path), "data/raw", "data/resized")
    report = json.loads(Path("data/resized/bad_images.json").read_text())
    assert report["counts"] == {"truncated or corrupt": 1}
    assert report["skipped"]["train"][0]["file_name"] == "train2014/COCO_train2014_000000000034.jpg"
    kept = read_split("data/resized", "train")
    assert 34 not in kept.captions and len(kept.images) == 5
    assert all(kept.image_path(r).is_file() for r in kept.images)
    with Image.open(kept.image_path(kept.images[0])) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    stage("vocab").main(str(params_path), "data/resized", "data/vocab.json")
    words = json.loads(Path("data/vocab.json").read_text())["words"]
    assert {"blue", "red", "photo"} <= set(words) and "karpathy" not in words
    loop.close()


def test_transfer_cut_halfway_resumes_without_refetching(server, tmp_path):
    archive = server.table()["val2014.zip"]
    half = archive.size // 2
    server.cut_after["val2014.zip"] = half
    with pytest.raises(DownloadError, match="run again to resume"):
        fetch(archive, tmp_path, base_url=server.url, retries=0)
    assert (tmp_path / "val2014.zip.part").stat().st_size == half
    assert not (tmp_path / "val2014.zip").exists()  # nothing that looks complete
    path = fetch(archive, tmp_path, base_url=server.url, retries=0)
    assert server.ranges[-1] == f"bytes={half}-"
    assert server.served["val2014.zip"] == archive.size  # the first half was not fetched again
    assert path.read_bytes() == server.files["val2014.zip"]
    assert not (tmp_path / "val2014.zip.part").exists()


def test_cut_transfer_is_retried_and_server_ignoring_range_restarts_cleanly(server, tmp_path):
    archive = server.table()["train2014.zip"]
    server.cut_after["train2014.zip"] = 100
    server.fail["train2014.zip"] = 1  # a 503 first
    server.ignore_range = True
    path = fetch(archive, tmp_path, base_url=server.url, retries=3, backoff=0)
    assert path.read_bytes() == server.files["train2014.zip"]  # restarted, not appended
    assert server.served["train2014.zip"] == 100 + archive.size


def test_corrupted_archive_is_rejected_leaving_nothing_complete(server, tmp_path):
    table = server.table()
    body = bytearray(server.files["caption_datasets.zip"])
    body[len(body) // 2] ^= 0xFF
    server.files["caption_datasets.zip"] = bytes(body)
    params = DataParams(source="flickr8k", images_dir=str(tmp_path), base_url=server.url)
    with pytest.raises(DownloadError, match="checksum mismatch.*deleted"):
        sources.build(params, 0, tmp_path / "downloads", table=table)
    assert sorted(os.listdir(tmp_path / "downloads")) == []  # no .part, no zip, no extracted folder


def test_zip_members_that_escape_or_link_are_refused(tmp_path):
    for bad in ("../evil.txt", "/tmp/evil.txt", "a/../../evil.txt"):
        path = tmp_path / "bad.zip"
        path.write_bytes(zip_bytes({"ok/fine.txt": b"x", bad: b"evil"}))
        with pytest.raises(DownloadError, match="outside the target folder; refused"):
            safe_extract(path, tmp_path / "out")
    link = zipfile.ZipInfo("train2014/link.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train2014/fine.jpg", b"x")
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(DownloadError, match="symbolic link; refused"):
        safe_extract(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_free_disk_space_is_checked_before_downloading(server, tmp_path):
    params = DataParams(source="coco2014", base_url=server.url)
    with pytest.raises(DownloadError, match=r"coco2014 needs \d+\.\d GB free .* but the disk has 0\.0 GB"):
        sources.build(dataclasses.replace(params), 0, tmp_path, table=sources.ARCHIVES, free_bytes=lambda p: 1000)
    assert not server.served  # stopped before the first byte


def test_karpathy_json_maps_to_the_right_splits(tmp_path):
    doc = json.loads(zipfile.ZipFile(io.BytesIO(coco_archives()["caption_datasets.zip"])).read("dataset_coco.json"))
    entries = sources.karpathy_entries(doc, "dataset_coco.json")
    assert [e["cocoid"] for e in entries["train"]] == [*TRAIN_IDS, 74, 139]  # restval trains
    assert [e["cocoid"] for e in entries["val"]] == [42, 133]
    assert [e["cocoid"] for e in entries["test"]] == [73, 136]
    doc["images"][0]["split"] = "holdout"
    with pytest.raises(DatasetError, match=r"images\[0\] split 'holdout'"):
        sources.karpathy_entries(doc, "dataset_coco.json")


def test_max_images_subset_is_reproducible():
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(100)]
    captions = {i: ["x"] for i in range(100)}
    a, _ = sources.subset(images, captions, 10, seed=3, split="train")
    b, caps = sources.subset(images, captions, 10, seed=3, split="train")
    c, _ = sources.subset(images, captions, 10, seed=4, split="train")
    assert a == b and a != c and len(a) == 10 and set(caps) == {r["id"] for r in a}
    assert [r["id"] for r in a] == sorted(r["id"] for r in a)  # file order kept
    assert sources.subset(images, captions, 0, seed=3, split="train")[0] == images


def test_flickr_missing_folder_and_missing_images_give_one_clear_error(server, tmp_path):
    karpathy = tmp_path / "dataset_flickr8k.json"
    karpathy.write_bytes(zipfile.ZipFile(io.BytesIO(server.files["caption_datasets.zip"])).read("dataset_flickr8k.json"))
    params = DataParams(source="flickr8k", images_dir=str(tmp_path / "nowhere"), karpathy_json=str(karpathy))
    with pytest.raises(DatasetError, match=r"data.images_dir: .*nowhere is not a folder"):
        sources.build(params, 0, tmp_path / "downloads")
    folder = tmp_path / "Flicker8k_Dataset"
    folder.mkdir()
    (folder / "1000.jpg").write_bytes(jpeg((1, 2, 3)))
    params = dataclasses.replace(params, images_dir=str(folder))
    with pytest.raises(DatasetError, match=rf"3 of 4 images are missing \(looked in {folder}\): 1001.jpg, 1002.jpg, 1003.jpg"):
        sources.build(params, 0, tmp_path / "downloads")
    dataset = sources.build(dataclasses.replace(params, on_bad_image="skip"), 0, tmp_path / "downloads")
    assert dataset.manifest["missing_images"] == 3
    assert not server.served  # a local Karpathy file: nothing downloaded
    with pytest.raises(ParamsError, match="data.source flickr30k needs data.images_dir"):
        DataParams(source="flickr30k").check()


def test_local_source_from_a_user_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "my photos"
    (folder / "sub").mkdir(parents=True)
    images, annotations = [], []
    for i in range(20):
        name = f"sub/p{i}.jpg" if i % 2 else f"p{i}.jpg"
        (folder / name).write_bytes(jpeg((10 * i, 100, 50)))
        images.append({"id": 500 + i, "file_name": name})
        annotations.append({"id": i, "image_id": 500 + i, "caption": f"my photo {i}"})
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations}))
    params_path = write_params(tmp_path / "params.yaml", source="local", images_dir=str(folder),
                               annotations=str(ann), val_fraction=0.1, test_fraction=0.2)
    stage("download").main(str(params_path), "data/raw", "data/downloads", "data/source.json", str(tmp_path))
    stage("resize").main(str(params_path), "data/raw", "data/resized")
    sizes = {s: len(read_split("data/resized", s).images) for s in SPLITS}
    assert sizes == {"train": 14, "val": 2, "test": 4}
    link = Path("data/raw/val/images")
    assert link.is_symlink() and link.resolve() == folder.resolve()  # the user's folder, linked, not copied
    ids = [r["id"] for s in SPLITS for r in read_split("data/raw", s).images]
    assert sorted(ids) == list(range(500, 520))
    first = Path("data/raw/test/captions.json").read_bytes()
    stage("download").main(str(params_path), "data/raw", "data/downloads", "data/source.json", str(tmp_path))
    assert Path("data/raw/test/captions.json").read_bytes() == first  # the split is seeded

    # A Karpathy-format file as data.annotations brings its own split.
    karpathy = {"images": [{"filename": r["file_name"], "imgid": r["id"], "split": s,
                            "sentences": [{"raw": "a photo"}]}
                           for r, s in zip(images, ["train"] * 16 + ["val"] * 2 + ["test"] * 2)]}
    ann.write_text(json.dumps(karpathy))
    stage("download").main(str(params_path), "data/raw", "data/downloads", "data/source.json", str(tmp_path))
    assert [len(read_split("data/raw", s).images) for s in SPLITS] == [16, 2, 2]


def test_seed_preset_parses_into_the_seeds_configuration(tmp_path):
    overrides, params = load_preset(REPO / "presets" / "seed-coco.yaml", REPO / "params.yaml")
    m, t = params.model, params.train
    assert params.data.source == "coco2014" and params.vocab.threshold == 4 and params.pretrain.epochs == 0
    assert (m.backbone, m.pretrained, m.train_backbone, m.image_size) == ("resnet152", True, False, 224)
    assert (m.embed_size, m.hidden_size, m.num_layers) == (256, 512, 1)
    assert (t.batch_size, t.lr, t.schedule, t.epochs, t.hflip, t.random_crop) == (128, 0.001, "constant", 5, True,
                                                                                 True)
    assert (t.checkpoint_every, t.log_every, params.resize.side) == (1000, 10, 256)
    # greedy, float32, IMAGENET1K_V1 (the seed's pretrained=True), the last epoch kept
    assert (params.evaluate.beam_size, params.compute.bf16, m.weights_version) == (1, False, "IMAGENET1K_V1")
    assert (t.select_metric, t.patience, m.decoder, m.max_seq_len) == ("last", 0, "lstm", 20)
    assert "-S model.pretrained=true" in flags(overrides) and "-S train.lr=0.001" in flags(overrides)
    recipe = load_preset(REPO / "presets" / "coco.yaml", REPO / "params.yaml")[1]
    assert (recipe.model.decoder, recipe.model.grid_layer, recipe.model.image_size) == ("attention", "layer4", 224)
    assert recipe.evaluate.beam_size == 3
    assert (recipe.compute.bf16, recipe.train.select_metric, recipe.data.source) == (True, "cider", "coco2014")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ParamsError, match="did you mean 'train.lr'"):
        load_preset(bad, REPO / "params.yaml")
    bad.write_text("data:\n  on_bad_image: ignore\n")
    with pytest.raises(ParamsError, match="data.on_bad_image must be one of error, skip"):
        load_preset(bad, REPO / "params.yaml")


@pytest.mark.slow
def test_dvc_repro_coco2014_from_the_loopback_server(server, tmp_path):
    """The real `dvc repro` of download, resize and vocab with data.source coco2014 in a clone."""
    from pipeline_repo import make_clone, shell

    clone, env = make_clone(tmp_path, {"data": {"source": "coco2014", "base_url": server.url,
                                                "checksums": "inputs/data/checksums.json"},
                                       "resize": {"side": 32, "workers": 1}})
    checksums = clone / "inputs" / "data" / "checksums.json"
    checksums.write_text(json.dumps({n: {"size": a.size, "checksum": a.checksum}
                                     for n, a in server.table().items() if n in server.files}))
    out = shell(["dvc", "repro", "vocab"], clone, env)
    for name in ("download", "resize", "vocab"):
        assert f"Running stage '{name}'" in out
    assert "download: coco2014 -> data/raw: 6 train, 2 val, 2 test images" in out
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    raw = next(o for o in lock["download"]["outs"] if o["path"] == "data/raw")
    assert raw["nfiles"] == 4  # three captions files and source.json: DVC never hashes the COCO images
    resized = {o["path"]: o.get("nfiles", 1) for o in lock["resize"]["outs"]}
    assert sum(resized.values()) == 10 + 3 + 1  # the resized images, their captions, the report
    assert sorted(resized) == ["data/resized/bad_images.json", "data/resized/test", "data/resized/train",
                               "data/resized/val"]
    assert (clone / "data" / "raw" / "train" / "images" / "train2014" / "COCO_train2014_000000000009.jpg").is_file()
    served = sum(server.served.values())
    assert "Running stage" not in shell(["dvc", "repro", "vocab"], clone, env)
    shell(["dvc", "repro", "-f", "download"], clone, env)  # rebuilt from the cache: nothing fetched
    assert sum(server.served.values()) == served
    assert "up to date" in shell(["dvc", "status", "vocab"], clone, env)
    # The download cache removed (another disk, a cleanup): download fetches it again, never a
    # run-cache restore of the captions alone that would send resize to missing images.
    shutil.rmtree(clone / "data" / "downloads")
    params_text = (clone / "params.yaml").read_text()
    params = yaml.safe_load(params_text)
    params["resize"]["side"] = 48  # resize must rerun: it may only ever meet the images
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run(["dvc", "repro", "vocab"], cwd=clone, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "resize: data/raw/train/images/train2014 links to" in done.stderr and "run `dvc repro -f download`" in done.stderr
    assert not any((clone / "data" / "resized").rglob("*.jpg")) or "resize:" in done.stderr
    out = shell(["dvc", "repro", "-f", "download"], clone, env)  # the fix the message names
    assert sum(server.served.values()) > served
    assert (clone / "data" / "raw" / "train" / "images" / "train2014" / "COCO_train2014_000000000009.jpg").is_file()
    out = shell(["dvc", "repro", "vocab"], clone, env)
    assert "Running stage 'resize'" in out
    # data/raw itself removed: never a run-cache restore of the captions without their images
    shutil.rmtree(clone / "data" / "raw")
    (clone / "params.yaml").write_text(params_text)  # back to params the run-cache has seen
    out = shell(["dvc", "repro", "vocab"], clone, env)
    assert "Running stage 'download'" in out and "Stage 'download' is cached" not in out
    assert "up to date" in shell(["dvc", "status", "vocab"], clone, env)
    # A file a param names is a dependency by content: the same path with other content reruns.
    checksums.write_text(json.dumps(json.loads(checksums.read_text()), indent=1))
    assert "inputs/data" in shell(["dvc", "status", "download"], clone, env)
    outside = tmp_path / "checksums.json"
    outside.write_text(checksums.read_text())
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["data"]["checksums"] = str(outside)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run(["dvc", "repro", "download"], cwd=clone, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"download: data.checksums: {outside} is outside inputs/data/" in done.stderr
