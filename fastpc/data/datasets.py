"""Public entry points: :func:`load_dataset` and :func:`make_loaders`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from fastpc.errors import UserError

from . import sources
from .cifar import find_cifar_dir, load_cifar
from .idx import find_idx_files, read_idx_pair
from .imagefolder import collect_images, find_split_dir, list_classes, load_image_folder, parse_image_size
from .loader import BatchLoader, split_indices
from .stream import StreamLoader, default_workers, resolve_stream

__all__ = ["Dataset", "DatasetInfo", "Loaders", "load_dataset", "make_loaders", "normalize"]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset."""

    name: str
    num_classes: int
    in_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None = None
    path: Path | None = None  # folder the data was read from


@dataclass
class Dataset:
    """One split held in memory: normalised float32 ``x`` (N, C, H, W) and int64 ``y`` (N,)."""

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    in_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None
    path: Path  # folder the data was read from

    def __len__(self) -> int:
        return len(self.y)

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo(self.name, self.num_classes, self.in_shape, self.mean, self.std, self.classes, self.path)


class Loaders(NamedTuple):
    """``train, val, test, info = make_loaders(...)``; ``val`` is None without a val split."""

    train: BatchLoader | StreamLoader
    val: BatchLoader | StreamLoader | None
    test: BatchLoader | StreamLoader
    info: DatasetInfo


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
              size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``(x / 255 - mean) / std``, optionally resized (bilinear)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _match(spec: sources.DatasetSpec, folder: Path, split: str):
    """Reader-specific location of ``split`` inside ``folder``, or None."""
    if not folder.is_dir():
        return None
    if spec.kind == "idx":
        return find_idx_files(folder, spec.name, split)
    if spec.kind == "cifar":
        return find_cifar_dir(folder, spec.name, split)
    if find_split_dir(folder, "train") is None:  # imagefolder: train/ defines the classes
        return None
    return find_split_dir(folder, split)


def _how_to_get(spec: sources.DatasetSpec, download: bool) -> str:
    hints = [f"set data.root or $FASTPC_DATA to a folder with {spec.layout}"]
    if spec.name in sources.SOURCES and not download:
        hints.append("allow downloading (download=True)")
    if spec.apt:
        hints.append(f"apt-get install {spec.apt}")
    return ", or ".join(hints)


def _missing_root(spec: sources.DatasetSpec, root) -> Path | None:
    """``data.root`` when it is given but does not exist; a root that is a file is a UserError."""
    if root is None or str(root) == "":
        return None
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"data.root {path} is a file; expected a folder with {spec.layout}")
    return None if path.exists() else path


def _locate(spec: sources.DatasetSpec, root, split: str, download: bool):
    missing_root = _missing_root(spec, root)
    paths = sources.search_paths(spec.name, root)
    for p in paths:
        found = _match(spec, p, split)
        if found is not None and missing_root is not None:
            raise UserError(f"data.root {missing_root} does not exist (the {spec.name} data in {p} was not used); "
                            f"set data.root to a folder with {spec.layout}, or leave it unset")
        if found is not None:
            return found, p
    searched = ", ".join(str(p) for p in paths)
    if download and spec.name in sources.SOURCES:
        dest = sources.download_dir(spec.name, root)
        try:
            sources.fetch(spec.name, dest)
        except sources.DownloadError as e:
            raise UserError(f"{spec.name} {split} data not found (searched: {searched}) and downloading "
                            f"failed ({sources.one_line(e)}); {_how_to_get(spec, True)}") from None
        found = _match(spec, dest, split)
        if found is not None:
            return found, dest
        raise UserError(f"downloaded {spec.name} into {dest} but its {split} files are missing; "
                        f"expected {spec.layout}")
    raise UserError(f"{spec.name} {split} data not found; searched: {searched}; {_how_to_get(spec, download)}")


def load_dataset(name: str = "fashion-mnist", root: str | os.PathLike | None = None, split: str = "train",
                 download: bool = True, image_size: int | tuple[int, int] | None = None) -> Dataset:
    """Find (or download), read, validate and normalise one split of a dataset.

    ``split`` is ``"train"`` or ``"test"`` (for image folders ``test`` reads ``val/`` or
    ``test/``). ``image_size`` (int or ``(h, w)``) resizes images; it is needed for image
    folders whose images differ in size. Bad input raises :class:`UserError`.
    """
    spec = sources.SPECS[sources.check_name(name)]
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    size = parse_image_size(image_size)
    found, folder = _locate(spec, root, split, download)
    classes = spec.classes
    if spec.kind == "idx":
        images, labels = read_idx_pair(found[0], found[1], spec.num_classes)
        images = images[:, None]
    elif spec.kind == "cifar":
        images, labels, names = load_cifar(found, spec.name, split, spec.num_classes)
        classes = classes or names
    else:
        train_dir = find_split_dir(folder, "train")
        class_list = list_classes(train_dir)
        if not class_list:
            raise UserError(f"no class folders in {train_dir}; expected train/<class>/*.jpg|png")
        images, labels = load_image_folder(found, class_list, size)
        classes = tuple(class_list)
    num_classes = spec.num_classes or len(classes)
    x = normalize(images, spec.mean, spec.std, size if spec.kind != "imagefolder" else None)
    y = torch.from_numpy(labels)
    return Dataset(spec.name, split, x, y, num_classes, tuple(x.shape[1:]), spec.mean, spec.std,
                   classes, Path(folder))


def make_loaders(name: str = "fashion-mnist", batch_size: int = 64, seed: int = 0, val_split: float = 0.0,
                 root: str | os.PathLike | None = None, download: bool = True,
                 device: str | torch.device = "cpu", augment: bool | None = None,
                 eval_batch_size: int | None = None, drop_last: bool = False,
                 grouped: bool = False, classes_per_batch: int = 1,
                 image_size: int | tuple[int, int] | None = None, stream: bool | str = False,
                 workers: int | str = "auto") -> Loaders:
    """Build train / val / test loaders for a dataset.

    ``val_split`` carves a deterministic (by ``seed``) fraction out of the train split.
    ``augment=None`` enables random crop + flip for CIFAR and image folders only; it is
    applied to the train loader alone. ``grouped`` makes train batches class-grouped
    (see :class:`BatchLoader`). Val/test loaders are sequential with ``eval_batch_size``
    (default: ``batch_size``) and never drop examples. ``stream`` (image folders: true, false or
    auto, see :func:`fastpc.data.stream.resolve_stream`) decodes batches on the fly in
    ``workers`` DataLoader processes (:class:`StreamLoader`) instead of holding them in memory.
    """
    spec = sources.SPECS[sources.check_name(name)]
    if spec.kind == "imagefolder" and stream is not False and not grouped:
        streamed = _stream_loaders(spec, root, download, device, seed, val_split, batch_size, eval_batch_size,
                                   drop_last, augment, image_size, stream, workers)
        if streamed is not None:
            return streamed
    train = load_dataset(spec.name, root, "train", download, image_size)
    test = load_dataset(spec.name, root, "test", download, image_size)
    if len(train) == 0:
        raise UserError(f"{spec.name} train split in {train.path} holds no examples; expected at least one")
    if test.path != train.path:
        raise UserError(f"{spec.name} train data is in {train.path} but its test data in {test.path}; "
                        "expected both splits in one folder (set data.root to it)")
    if test.in_shape != train.in_shape:
        raise UserError(f"{spec.name} test images are {list(test.in_shape)} but train images are "
                        f"{list(train.in_shape)}; set data.image_size so both match")
    if augment is None:
        augment = spec.kind in ("cifar", "imagefolder")
    eval_bs = batch_size if eval_batch_size is None else eval_batch_size
    fill = [-m / s for m, s in zip(spec.mean, spec.std)]  # black, in normalised space
    x, y, val = train.x, train.y, None
    if val_split:
        tr_idx, va_idx = split_indices(len(y), val_split, seed)
        val = BatchLoader(x[va_idx], y[va_idx], eval_bs, seed, shuffle=False, device=device)
        x, y = x[tr_idx], y[tr_idx]
    train_loader = BatchLoader(x, y, batch_size, seed, shuffle=True, drop_last=drop_last, device=device,
                               augment=augment, fill=fill, grouped=grouped, classes_per_batch=classes_per_batch)
    test_loader = BatchLoader(test.x, test.y, eval_bs, seed, shuffle=False, device=device)
    return Loaders(train_loader, val, test_loader, train.info)


def _stream_loaders(spec: sources.DatasetSpec, root, download: bool, device, seed: int, val_split: float,
                    batch_size: int, eval_batch_size: int | None, drop_last: bool, augment: bool | None,
                    image_size, stream: bool | str, workers: int | str) -> Loaders | None:
    """:func:`make_loaders` for an image folder streamed by :class:`StreamLoader`; None when
    ``stream: auto`` decides to hold it in memory."""
    size = parse_image_size(image_size)
    found, folder = _locate(spec, root, "train", download)
    test_dir, test_folder = _locate(spec, root, "test", download)
    if test_folder != folder:
        raise UserError(f"{spec.name} train data is in {folder} but its test data in {test_folder}; "
                        "expected both splits in one folder (set data.root to it)")
    classes = list_classes(found)
    if not classes:
        raise UserError(f"no class folders in {found}; expected train/<class>/*.jpg|png")
    items = collect_images(found, classes)
    if not resolve_stream(stream, size, len(items)):
        return None
    test_items = collect_images(test_dir, classes)
    for split_dir, its in ((found, items), (test_dir, test_items)):
        if not its:
            raise UserError(f"no images found in {split_dir}; expected <class>/*.jpg|png")
    workers = default_workers() if workers == "auto" else workers
    opts = dict(seed=seed, device=device, mean=spec.mean, std=spec.std, workers=workers)
    eval_bs = batch_size if eval_batch_size is None else eval_batch_size
    val = None
    if val_split:
        tr_idx, va_idx = split_indices(len(items), val_split, seed)
        val = StreamLoader([items[i] for i in va_idx.tolist()], size, eval_bs, shuffle=False, **opts)
        items = [items[i] for i in tr_idx.tolist()]
    train = StreamLoader(items, size, batch_size, shuffle=True, drop_last=drop_last,
                         augment=True if augment is None else augment, **opts)
    test = StreamLoader(test_items, size, eval_bs, shuffle=False, **opts)
    info = DatasetInfo(spec.name, len(classes), (3, *size), spec.mean, spec.std, tuple(classes), Path(folder))
    return Loaders(train, val, test, info)
