"""Real dataset sources: COCO 2014/2017 and Flickr8k/30k on the Karpathy split, and a user's own.

Every source ends in the layout of `layout` (`<out>/<split>/captions.json` and
`<out>/<split>/images/<file_name>`), so vocab, resize and train never know where data came from.

Images are not copied into the dataset folder. `<split>/images` holds symlinks to where the
images are: the extracted archives in the download cache (COCO: `images/train2014 ->
.../train2014`, file names `train2014/COCO_train2014_....jpg`) or the user's folder (Flickr,
`local`). DVC does not follow symlinked folders inside an output (it walks with os.walk), so it
hashes and caches only the small captions files: 19 GB of COCO JPEGs are never hashed, cached or
pushed twice. What pins the images instead is the table below (every archive is checked against
its published size and checksum) and, for user folders, `source.json`, which fingerprints the
referenced files (names and sizes). The resized copies, which training reads, are a normal DVC
output and cached as usual.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captioning.download import Archive, check_free_space, fetch, safe_extract
from captioning.io import file_digest, read_json
from captioning.layout import DatasetError, SPLITS, captions_path, coco_captions, images_dir, parse_coco
from captioning.params import DataParams

# The one table of what is downloaded. COCO publishes no checksums itself; the md5 values are the
# ones every public loader pins (torchvision-style scripts in LAVIS, PaddleDetection, Detectron's
# setup scripts) and equal the S3 ETags of images.cocodataset.org; the sizes are the servers'
# Content-Length. caption_datasets.zip (Karpathy's split, 2015) has no published digest: its size
# and sha256 are as recorded by projects that pin it.
ARCHIVES = {a.name: a for a in (
    Archive("annotations_trainval2014.zip", "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
            252_872_794, "md5:0a379cfc70b0e71301e0f377548639bd"),
    Archive("train2014.zip", "http://images.cocodataset.org/zips/train2014.zip",
            13_510_573_713, "md5:0da8c0bd3d6becc4dcb32757491aca88"),
    Archive("val2014.zip", "http://images.cocodataset.org/zips/val2014.zip",
            6_645_013_297, "md5:a3d79f5ed8d289b7a7554ce06a5782b3"),
    Archive("annotations_trainval2017.zip", "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
            252_907_541, "md5:f4bbac642086de4f52a3fdda2de5fa2c"),
    Archive("train2017.zip", "http://images.cocodataset.org/zips/train2017.zip",
            19_336_861_798, "md5:cced6f7f71b7629ddf16f17bbcfab6b2"),
    Archive("val2017.zip", "http://images.cocodataset.org/zips/val2017.zip",
            815_585_330, "md5:442b8da7639aecaf257c1dceb8ba8c80"),
    Archive("caption_datasets.zip", "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
            36_745_453, "sha256:4cfd70132527b80933105e5829dc9034eaab9573482e2e680abbab6130244817"),
)}
KARPATHY_ZIP = "caption_datasets.zip"
KARPATHY_JSON = {"coco2014": "dataset_coco.json", "coco2017": "dataset_coco.json",
                 "flickr8k": "dataset_flickr8k.json", "flickr30k": "dataset_flickr30k.json"}
# COCO year -> (annotations archive, image archives); the image folder inside each zip is its stem.
COCO = {"coco2014": ("annotations_trainval2014.zip", ("train2014.zip", "val2014.zip")),
        "coco2017": ("annotations_trainval2017.zip", ("train2017.zip", "val2017.zip"))}
# Karpathy's splits; "restval" (the 30,504 val2014 images outside his val and test) trains, as in
# every paper that reports on this split: 82,783 + 30,504 = 113,287 train images.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
MISSING_EXAMPLES = 5  # missing file names shown in an error


@dataclass
class ResolvedSource:
    """A source, resolved: image records and captions per split, and where the images are."""

    splits: dict[str, tuple[list[dict], dict[int, list[str]]]]
    links: dict[str, Path]  # name under <split>/images ("" = images itself) -> folder it points to
    manifest: dict = field(default_factory=dict)  # what pins the inputs; written as source.json


def build(params: DataParams, seed: int, downloads: str | Path, *, table: dict[str, Archive] | None = None,
          free_bytes=None) -> ResolvedSource:
    """Resolve `params.source` (downloading what it needs into `downloads`) to a ResolvedSource."""
    table = table or load_table(params.checksums)
    downloads = Path(downloads)
    fetcher = _Fetcher(table, downloads, params.base_url, free_bytes)
    if params.source in COCO:
        dataset = _coco(params, fetcher)
    elif params.source in ("flickr8k", "flickr30k"):
        dataset = _flickr(params, fetcher)
    elif params.source == "local":
        dataset = _local(params, seed)
    else:
        raise ValueError(f"data.source {params.source!r} is not a downloaded source")
    dataset.splits = {split: subset(*dataset.splits[split], params.max_images, seed, split) for split in SPLITS}
    for split in SPLITS:
        if not dataset.splits[split][0]:
            raise DatasetError(f"{params.source}: the {split} split is empty; check data.* (val/test fractions, max_images)")
    missing = check_images(dataset, params.on_bad_image)
    dataset.manifest.update(source=params.source, max_images=params.max_images, missing_images=missing,
                            images={s: len(dataset.splits[s][0]) for s in SPLITS})
    return dataset


def write(out: str | Path, dataset: ResolvedSource) -> None:
    """Write the pipeline layout for `dataset` under `out` (a new folder)."""
    out = Path(out)
    for split in SPLITS:
        images, captions = dataset.splits[split]
        folder = images_dir(out, split)
        folder.parent.mkdir(parents=True, exist_ok=True)
        for name, target in dataset.links.items():
            link = folder / name if name else folder
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(_link_target(target, link), link, target_is_directory=True)
        doc = coco_captions(images, captions, f"{dataset.manifest['source']} {split}")
        captions_path(out, split).write_text(json.dumps(doc, separators=(",", ":")))
    (out / "source.json").write_text(json.dumps(dataset.manifest, indent=2, sort_keys=True) + "\n")


def _link_target(target: Path, link: Path) -> str:
    # Inside the repo (the download cache) a relative link survives moving the clone; a user's
    # folder elsewhere is linked absolutely. Paths are not resolved, so a data/downloads that is
    # itself a symlink to a bigger disk keeps working.
    target = Path(os.path.abspath(target))
    if target.is_relative_to(Path.cwd()):
        return os.path.relpath(target, os.path.abspath(link.parent))
    return str(target)


# torchvision's ImageNet weights files (captioning.imagenet): a mirror's checksums may list them too
WEIGHTS_FILE = re.compile(r"^resnet\d+-[0-9a-f]{8,}\.pth$")


def load_table(checksums: str) -> dict[str, Archive]:
    """The archive table, with sizes/checksums overridden (or, for weights files, given) by a JSON
    file: a mirror's own copies."""
    if not checksums:
        return dict(ARCHIVES)
    raw = read_json(checksums)
    table = dict(ARCHIVES)
    for name, entry in (raw.items() if isinstance(raw, dict) else []):
        known = name in table or WEIGHTS_FILE.match(str(name))
        if not known or not isinstance(entry, dict) or set(entry) != {"size", "checksum"}:
            raise DatasetError(f"{checksums}: entry {name!r} must be one of {sorted(table)} or a torchvision "
                               "weights file (resnet18-f37072fd.pth), with exactly 'size' and 'checksum'")
        url = table[name].url if name in table else ""  # a weights file's address comes from torchvision
        table[name] = Archive(name, url, int(entry["size"]), str(entry["checksum"]))
    return table


class _Fetcher:
    """Downloads, verifies and extracts archives into the cache, once each."""

    def __init__(self, table: dict[str, Archive], downloads: Path, base_url: str, free_bytes):
        self.table, self.downloads, self.base_url, self.free_bytes = table, downloads, base_url, free_bytes

    def folder(self, name: str) -> Path:
        # The digest in the folder name: archives with other contents never share a folder.
        archive = self.table[name]
        return self.downloads / f"{name.removesuffix('.zip')}-{archive.digest[:8]}"

    def check_space(self, names: list[str], what: str) -> None:
        """Free space for the archives still to fetch: their extracted files plus the largest zip
        (each zip is deleted once extracted)."""
        pending = [self.table[n] for n in names if not self.folder(n).is_dir()]
        if not pending:
            return
        part_bytes = [(self.downloads / f"{a.name}.part") for a in pending]
        remaining = [a.size - (p.stat().st_size if p.is_file() else 0) for a, p in zip(pending, part_bytes)]
        check_free_space(self.downloads, sum(a.size for a in pending) + max(remaining), what, self.free_bytes)

    def extracted(self, name: str, keep=lambda member: True) -> Path:
        folder = self.folder(name)
        if folder.is_dir():
            return folder  # renamed into place only after a verified archive was fully extracted
        path = fetch(self.table[name], self.downloads, base_url=self.base_url)
        safe_extract(path, folder, keep, free_bytes=self.free_bytes)
        path.unlink()  # the extracted folder is the cache now; keeping the zip would double the disk
        return folder


def _karpathy(params: DataParams, fetcher: _Fetcher) -> tuple[Path, dict]:
    """Karpathy's split file for the source: `data.karpathy_json`, or from caption_datasets.zip."""
    name = KARPATHY_JSON[params.source]
    if params.karpathy_json:
        path = Path(params.karpathy_json).expanduser()
    else:
        path = fetcher.extracted(KARPATHY_ZIP, keep=lambda m: m.endswith(".json")) / name
    return path, read_json(path, missing=f"expected Karpathy's {name}")


def karpathy_entries(doc, path: str | Path) -> dict[str, list[dict]]:
    """Karpathy-format images grouped into train/val/test (restval -> train), in file order."""
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DatasetError(f"{path}: no 'images' list; expected Karpathy's dataset_*.json format")
    out: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for n, entry in enumerate(doc["images"]):
        if not isinstance(entry, dict) or not {"filename", "split", "sentences"} <= entry.keys():
            raise DatasetError(f"{path}: images[{n}] needs 'filename', 'split' and 'sentences', got {entry!r:.200}")
        if entry["split"] not in KARPATHY_SPLITS:
            raise DatasetError(f"{path}: images[{n}] split {entry['split']!r} is not one of {', '.join(KARPATHY_SPLITS)}")
        if not isinstance(entry["sentences"], list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str)
                                                               for s in entry["sentences"]):
            raise DatasetError(f"{path}: images[{n}] sentences must be a list of {{'raw': str, ...}}")
        out[KARPATHY_SPLITS[entry["split"]]].append(entry)
    return out


def _coco(params: DataParams, fetcher: _Fetcher) -> ResolvedSource:
    annotations, image_zips = COCO[params.source]
    fetcher.check_space([annotations, KARPATHY_ZIP, *image_zips], params.source)
    ann_root = fetcher.extracted(annotations, keep=lambda m: Path(m).name.startswith("captions_"))
    official: dict[int, tuple[dict, list[str]]] = {}
    for image_zip in image_zips:
        stem = image_zip.removesuffix(".zip")  # train2014, val2014, ...
        path = ann_root / "annotations" / f"captions_{stem}.json"
        images, captions, _ = parse_coco(read_json(path), path, keep_empty=True)
        for record in images:
            official[record["id"]] = ({**record, "file_name": f"{stem}/{record['file_name']}"}, captions[record["id"]])
    karpathy_path, doc = _karpathy(params, fetcher)
    splits = {}
    for split, entries in karpathy_entries(doc, karpathy_path).items():
        images, captions = [], {}
        for entry in entries:
            if entry.get("cocoid") not in official:
                raise DatasetError(f"{karpathy_path}: image {entry.get('filename')!r} (cocoid {entry.get('cocoid')}) "
                                   f"is not in the {params.source} annotations")
            record, caps = official[entry["cocoid"]]
            images.append({k: record[k] for k in ("id", "file_name", "width", "height") if k in record})
            captions[record["id"]] = caps  # the official captions, not Karpathy's copies
        splits[split] = (images, captions)
    links = {}
    for image_zip in image_zips:
        stem = image_zip.removesuffix(".zip")
        links[stem] = fetcher.extracted(image_zip, keep=lambda m: m.lower().endswith(".jpg")) / stem
    manifest = {"archives": {n: fetcher.table[n].checksum for n in (annotations, *image_zips)},
                "karpathy": _karpathy_pin(params, fetcher, karpathy_path)}
    return ResolvedSource(splits, links, manifest)


def _flickr(params: DataParams, fetcher: _Fetcher) -> ResolvedSource:
    folder = _user_folder(params)
    karpathy_path, doc = _karpathy(params, fetcher)
    return ResolvedSource(_from_karpathy(doc, karpathy_path), {"": folder},
                   {"karpathy": _karpathy_pin(params, fetcher, karpathy_path)})


def _local(params: DataParams, seed: int) -> ResolvedSource:
    folder = _user_folder(params)
    if not params.annotations:
        raise DatasetError("data.source local needs data.annotations: a COCO captions json (or a Karpathy-format "
                           "json with a 'split' per image)")
    path = Path(params.annotations).expanduser()
    doc = read_json(path)
    if isinstance(doc, dict) and isinstance(doc.get("images"), list) and "annotations" not in doc:
        splits = _from_karpathy(doc, path)  # Karpathy format: its own split per image
    else:
        images, captions, _ = parse_coco(doc, path, keep_empty=True)
        splits = split_by_fraction(images, captions, params.val_fraction, params.test_fraction, seed)
    return ResolvedSource(splits, {"": folder}, {"annotations": _sha256(path)})


def _from_karpathy(doc, path) -> dict[str, tuple[list[dict], dict[int, list[str]]]]:
    splits, seen = {}, set()
    for split, entries in karpathy_entries(doc, path).items():
        images, captions = [], {}
        for entry in entries:
            image_id = entry.get("imgid", entry.get("cocoid"))
            if not isinstance(image_id, int) or image_id in seen:
                raise DatasetError(f"{path}: image {entry['filename']!r} needs a unique integer 'imgid', got {image_id!r}")
            seen.add(image_id)
            name = f"{entry['filepath']}/{entry['filename']}" if entry.get("filepath") else entry["filename"]
            images.append({"id": image_id, "file_name": name})
            captions[image_id] = [s["raw"].strip() for s in entry["sentences"]]
        # Same checks as any COCO file (safe file names); resize counts empty captions.
        doc_split = coco_captions(images, captions, "")
        images, captions, _ = parse_coco(doc_split, path, keep_empty=True)
        splits[split] = (images, captions)
    return splits


def split_by_fraction(images: list[dict], captions: dict[int, list[str]], val_fraction: float,
                      test_fraction: float, seed: int):
    """A seeded train/val/test split of one COCO file (order within each split kept)."""
    order = np.random.default_rng([seed, 17]).permutation(len(images))
    n_val, n_test = (max(1, round(f * len(images))) for f in (val_fraction, test_fraction))
    chosen = {"test": set(order[:n_test].tolist()), "val": set(order[n_test:n_test + n_val].tolist())}
    out = {}
    for split in SPLITS:
        keep = [r for i, r in enumerate(images)
                if (i in chosen[split] if split != "train" else not any(i in c for c in chosen.values()))]
        out[split] = (keep, {r["id"]: captions[r["id"]] for r in keep})
    return out


def subset(images: list[dict], captions: dict, max_images: int, seed: int, split: str):
    """`max_images` images of a split drawn by (seed, split), in file order; 0 = all."""
    if not 0 < max_images < len(images):
        return images, captions
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    keep = sorted(rng.choice(len(images), size=max_images, replace=False).tolist())
    images = [images[i] for i in keep]
    return images, {r["id"]: captions[r["id"]] for r in images}


def _user_folder(params: DataParams) -> Path:
    if not params.images_dir:
        raise DatasetError(f"data.source {params.source} needs data.images_dir: the folder holding its images "
                           "(they cannot be downloaded freely)")
    folder = Path(params.images_dir).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"data.images_dir: {folder.resolve()} is not a folder; point it at the {params.source} images")
    return folder


def check_images(dataset: ResolvedSource, on_bad_image: str) -> int:
    """Count referenced images that are not there; with on_bad_image=error stop, listing them.

    With `skip` they stay listed: resize meets them, skips them and names them in its report.
    Sizes of the found files go into the manifest so that a changed user folder changes it.
    """
    missing, looked, sizes = [], set(), hashlib.sha256()
    for split in SPLITS:
        for record in dataset.splits[split][0]:
            path = _resolve(dataset.links, record["file_name"])
            try:
                sizes.update(f"{record['file_name']}\0{path.stat().st_size}\n".encode())
            except OSError:
                missing.append(record["file_name"])
                looked.add(os.path.abspath(path.parent))
    total = sum(len(dataset.splits[s][0]) for s in SPLITS)
    if missing and (on_bad_image == "error" or len(missing) == total):
        where = ", ".join(sorted(looked)[:3]) + (" ..." if len(looked) > 3 else "")
        examples = ", ".join(missing[:MISSING_EXAMPLES]) + (", ..." if len(missing) > MISSING_EXAMPLES else "")
        raise DatasetError(f"{len(missing)} of {total} images are missing (looked in {where}): {examples}. "
                           "Point data.images_dir at the complete folder, or set data.on_bad_image: skip "
                           "to leave them out and list them in the resize report")
    dataset.manifest["image_files"] = sizes.hexdigest()
    return len(missing)


def _resolve(links: dict[str, Path], file_name: str) -> Path:
    if "" in links:
        return links[""] / file_name
    head, _, rest = file_name.partition("/")
    return links[head] / rest if head in links else Path("/nonexistent") / file_name


def _karpathy_pin(params: DataParams, fetcher: _Fetcher, path: Path) -> str:
    return _sha256(path) if params.karpathy_json else fetcher.table[KARPATHY_ZIP].checksum


def _sha256(path: Path) -> str:
    return "sha256:" + file_digest(path)
