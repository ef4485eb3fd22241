"""Image-folder reader (ImageNet / Tiny-ImageNet layout), decoded with Pillow.

Layout: ``root/train/<class>/**/*.jpg|png|...`` and ``root/val/<class>/...`` (or
``root/test/<class>/...``); classes are the sorted sub-folder names of ``train/``.
Tiny-ImageNet's ``val/images/*`` + ``val/val_annotations.txt`` is understood too.
Every image is converted to RGB and resized (bilinear) to ``image_size``; without
``image_size`` all images must already share one size.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastpc.errors import UserError

from .sources import one_line

__all__ = ["IMAGE_EXTENSIONS", "collect_images", "find_split_dir", "list_classes", "load_image_folder", "open_rgb",
           "parse_image_size"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"})
_SPLIT_DIRS = {"train": ("train",), "test": ("val", "test")}


def parse_image_size(image_size: object) -> tuple[int, int] | None:
    """``None``, an int, or ``[h, w]`` -> ``(h, w)``; anything else raises UserError."""
    if image_size is None:
        return None
    if isinstance(image_size, bool):
        pass
    elif isinstance(image_size, int) and image_size > 0:
        return (image_size, image_size)
    elif isinstance(image_size, (list, tuple)) and len(image_size) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size):
        return (int(image_size[0]), int(image_size[1]))
    raise UserError(f"data.image_size must be a positive int or [height, width], got {image_size!r}")


def find_split_dir(folder: Path, split: str) -> Path | None:
    """``folder/train`` for the train split, ``folder/val`` or ``folder/test`` otherwise."""
    for d in _SPLIT_DIRS[split]:
        if (folder / d).is_dir():
            return folder / d
    return None


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()


def list_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names of ``split_dir`` (hidden folders ignored)."""
    try:
        classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise UserError(f"cannot list {split_dir}: {one_line(e.strerror or e)}") from None
    return classes


def _tiny_imagenet_val(split_dir: Path, class_index: dict[str, int]) -> list[tuple[Path, int]]:
    ann = split_dir / "val_annotations.txt"
    items = []
    for lineno, line in enumerate(ann.read_text().splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in class_index:
            raise UserError(f"{ann} line {lineno} names class {parts[1]!r} that has no folder in train/; "
                            "expected one of the train class folders")
        items.append((split_dir / "images" / parts[0], class_index[parts[1]]))
    return items


def collect_images(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """``(path, class index)`` of every image of ``split_dir``, classes indexed as in ``classes``
    (sorted paths within a class; Tiny-ImageNet's annotated val folder in annotation order)."""
    class_index = {c: i for i, c in enumerate(classes)}
    if (split_dir / "val_annotations.txt").is_file() and (split_dir / "images").is_dir():
        return _tiny_imagenet_val(split_dir, class_index)
    items = []
    for c in list_classes(split_dir):
        if c not in class_index:
            raise UserError(f"class folder {split_dir / c} has no counterpart in train/; "
                            f"expected one of: {', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}")
        files = sorted(p for p in (split_dir / c).rglob("*") if _is_image(p))
        items += [(p, class_index[c]) for p in files]
    return items


def open_rgb(path: Path, transform: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """Open ``path`` with Pillow and return ``transform(image)`` converted to RGB and fully decoded.

    ``transform`` gets the still-undecoded image, so it may call ``im.draft`` (JPEG: decode at
    1/2, 1/4 or 1/8 scale, no smaller than asked) before resizing. An unreadable or corrupt
    image is a one-line UserError naming the file."""
    try:
        with Image.open(path) as im:
            out = transform(im).convert("RGB")
            out.load()
            return out
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot decode image {path} ({one_line(e)}); remove it or replace it with a valid image") from None


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    def resize(im: Image.Image) -> Image.Image:
        if size is not None and im.format == "JPEG":
            im.draft("RGB", (size[1], size[0]))  # cheap JPEG downscale before the exact resize
        im = im.convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return im

    return np.asarray(open_rgb(path, resize), dtype=np.uint8)


def load_image_folder(split_dir: Path, classes: list[str], image_size: tuple[int, int] | None = None,
                      workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image of ``split_dir``: ``(uint8 (N, 3, H, W), int64 (N,))``."""
    items = collect_images(split_dir, classes)
    if not items:
        raise UserError(f"no images found in {split_dir}; expected <class>/*.jpg|png "
                        f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    first = _decode(items[0][0], image_size)
    h, w = first.shape[:2]
    out = np.empty((len(items), h, w, 3), dtype=np.uint8)
    out[0] = first

    def work(i: int) -> None:
        img = _decode(items[i][0], image_size)
        if img.shape[:2] != (h, w):
            raise UserError(f"image {items[i][0]} is {img.shape[1]}x{img.shape[0]} but "
                            f"{items[0][0]} is {w}x{h}; set data.image_size to resize all images")
        out[i] = img

    workers = workers or min(8, os.cpu_count() or 1)
    if len(items) > 64 and workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(1, len(items))))
    else:
        for i in range(1, len(items)):
            work(i)
    y = np.fromiter((c for _, c in items), dtype=np.int64, count=len(items))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)), y
