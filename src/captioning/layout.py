"""The on-disk layout every source ends in (see `sources`), and that the later stages read:

    <root>/<split>/captions.json   COCO captions format: images[{id, file_name, width, height, ...}],
                                   annotations[{id, image_id, caption}]
    <root>/<split>/images/<file_name>

for split in train, val, test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from captioning.errors import UserError
from captioning.io import read_json
from captioning.text import has_words

SPLITS = ("train", "val", "test")


class DatasetError(UserError, ValueError):
    """Malformed dataset input; the message names the file and the record."""


@dataclass(frozen=True)
class Split:
    """One split read from its captions file."""

    images: list[dict]  # COCO image records, in file order
    captions: dict[int, list[str]]  # image id -> its reference captions
    images_dir: Path
    empty_captions: int = 0  # skipped: nothing left after tokenization

    def image_path(self, record: dict) -> Path:
        return self.images_dir / record["file_name"]

    def captioned(self) -> list[dict]:
        """The image records that have a caption: the only ones a stage can train on or score."""
        return [r for r in self.images if self.captions[r["id"]]]


def captions_path(root: str | Path, split: str) -> Path:
    return Path(root) / split / "captions.json"


def images_dir(root: str | Path, split: str) -> Path:
    return Path(root) / split / "images"


def read_split(root: str | Path, split: str) -> Split:
    """Read `<root>/<split>/captions.json`, its images in `<root>/<split>/images`."""
    path = captions_path(root, split)
    images, captions, empty = parse_coco(read_json(path, missing="run the download stage first (dvc repro download)"), path)
    return Split(images, captions, images_dir(root, split), empty_captions=empty)


def check_links(root: str | Path) -> None:
    """Stop, naming the fix, if a split's images are links whose target is gone.

    Real sources link `<split>/images` (or folders in it) to the download cache or the user's
    folder (see sources.py). DVC does not track what the links point to, so removing the cache
    leaves captions whose images are gone; no stage may then read on as if images were bad."""
    for split in SPLITS:
        folder = images_dir(root, split)
        links = [folder] if folder.is_symlink() else [p for p in sorted(folder.iterdir()) if p.is_symlink()] \
            if folder.is_dir() else []
        for link in links:
            if not link.exists():
                raise DatasetError(f"{link} links to {os.readlink(link)}, which is gone (a removed download "
                                   "cache or a moved image folder): run `dvc repro -f download` to fetch or "
                                   "link the images again")


def parse_coco(coco, path: str | Path, keep_empty: bool = False) -> tuple[list[dict], dict[int, list[str]], int]:
    """Check a COCO captions document; return (image records, image id -> captions, empty captions).

    Every record problem is a DatasetError naming `path` and the record. Empty or punctuation-only
    captions teach nothing: they are skipped and counted. Images without a caption are kept
    (with an empty list); the stages that need captions leave them out and count them.
    `keep_empty` keeps empty captions: the download stage passes them on for resize to count.
    """
    if not isinstance(coco, dict):
        raise DatasetError(f"{path}: expected a COCO captions object, got {type(coco).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(coco.get(key), list):
            raise DatasetError(f"{path}: no '{key}' list; expected COCO captions format")
    captions: dict[int, list[str]] = {}
    for n, image in enumerate(coco["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DatasetError(f"{path}: images[{n}] needs 'id' and 'file_name', got {image!r:.200}")
        if image["id"] in captions:
            raise DatasetError(f"{path}: images[{n}] repeats image id {image['id']!r}; ids must be unique")
        if not _safe_relative(image["file_name"]):
            raise DatasetError(f"{path}: images[{n}] file_name {image['file_name']!r} must be a relative path "
                               "inside the images folder (no leading '/', no '..')")
        captions[image["id"]] = []
    empty = 0
    for n, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise DatasetError(f"{path}: annotations[{n}] needs 'image_id' and 'caption', got {ann!r:.200}")
        if ann["image_id"] not in captions:
            raise DatasetError(f"{path}: annotations[{n}] refers to image_id {ann['image_id']} not in 'images'")
        if not isinstance(ann["caption"], str):
            raise DatasetError(f"{path}: annotations[{n}] caption must be a string, got {ann['caption']!r:.100}")
        if not has_words(ann["caption"]):
            empty += 1  # an empty or punctuation-only caption teaches nothing: skipped, counted
            if not keep_empty:
                continue
        captions[ann["image_id"]].append(ann["caption"])
    return coco["images"], captions, empty


def _safe_relative(name) -> bool:
    # A file_name escaping the folder would let the resize stage write outside its output.
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\\" in name:
        return False
    return ".." not in Path(name).parts and not Path(name).is_absolute()


def coco_captions(images: list[dict], captions: dict[int, list[str]], description: str) -> dict:
    """A COCO captions document for `images` and their captions (annotation ids numbered in order)."""
    annotations = []
    for image in images:
        for caption in captions[image["id"]]:
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "caption": caption})
    return {"info": {"description": description}, "licenses": [], "images": images,
            "annotations": annotations}
