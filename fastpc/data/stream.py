"""Streaming image-folder loader for ImageNet-size data: decode + augment in DataLoader workers.

The in-memory loaders (:class:`fastpc.data.BatchLoader`) hold a whole split in one tensor; at
224 x 224 ImageNet does not fit. :class:`StreamLoader` keeps only the file list and decodes each
batch with Pillow in ``torch.utils.data.DataLoader`` worker processes:

- training: RandomResizedCrop(image_size, scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip
  (torchvision's algorithm, written with Pillow);
- evaluation (and training without augmentation): resize the shorter side to
  ``image_size * 256 / 224``, then center-crop ``image_size``;
- JPEGs are decoded in draft mode (1/2, 1/4 or 1/8 scale, never below what the crop needs).

Workers hand back uint8 ``(B, 3, H, W)`` batches (pinned on CUDA); normalisation
``(x / 255 - mean) / std`` runs on the target device, in the same float32 operations as
:func:`fastpc.data.normalize`. Reproducible: the epoch's order is the seeded global order of
:class:`~fastpc.data.BatchLoader` (:func:`~fastpc.data.loader.shuffled_order`, from
``(seed, epoch)``), and each example's crop and flip come from a generator seeded by
``(seed, epoch, example index)``, so a resumed run (``set_epoch``) sees the same crops as an
uninterrupted one, whatever ``workers`` is.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from fastpc.errors import UserError

from .imagefolder import open_rgb
from .loader import batches_per_epoch, check_shard, make_generator, shuffled_order

__all__ = ["StreamLoader", "ImageFolderStream", "EVAL_RESIZE", "STREAM_AUTO_SIZE", "STREAM_AUTO_IMAGES",
           "default_workers", "resolve_stream", "train_crop_box", "eval_size"]

EVAL_RESIZE = 256 / 224  # evaluation: shorter side to image_size * 256/224, then center crop
STREAM_AUTO_SIZE = 128  # data.stream auto: stream image folders at image_size >= this ...
STREAM_AUTO_IMAGES = 50_000  # ... or with more training images than this
_CROP_STREAM = 3  # this module's per-example crop/flip generators
_SCALE, _RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def default_workers() -> int:
    """``data.workers: auto``: min(8, the CPU cores this process may use, shared among the
    processes torchrun started on this node)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(8, cores // local))


def resolve_stream(stream: bool | str, image_size: tuple[int, int] | None, n_train: int) -> bool:
    """``data.stream``: true / false as given; auto streams an image folder when ``image_size``
    is set and at least :data:`STREAM_AUTO_SIZE` on its shorter side, or when the training split
    holds more than :data:`STREAM_AUTO_IMAGES` images. Streaming needs ``image_size``."""
    if stream is True and image_size is None:
        raise UserError("data.stream=true needs data.image_size (the crop size, e.g. 224)")
    if stream == "auto":
        return image_size is not None and (min(image_size) >= STREAM_AUTO_SIZE or n_train > STREAM_AUTO_IMAGES)
    return bool(stream)


def train_crop_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(left, top, w, h)`` on a ``width x height`` image: area
    fraction uniform in (0.08, 1), aspect ratio log-uniform in (3/4, 4/3), 10 tries, then the
    center crop of the ratio clamped into that range (torchvision's ``get_params``)."""
    area = width * height
    log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        w, h = width, int(round(width / _RATIO[0]))
    elif in_ratio > _RATIO[1]:
        h, w = height, int(round(height * _RATIO[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def eval_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """The evaluation resize ``(w, h)``: the shorter side to ``round(min(size) * 256/224)``,
    the aspect ratio kept (torchvision's ``Resize(int)``)."""
    short = int(round(min(size) * EVAL_RESIZE))
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


class _Failed:
    """An example that could not be decoded: carried to the main process as its message."""

    def __init__(self, message: str) -> None:
        self.message = message


class ImageFolderStream(torch.utils.data.Dataset):
    """Map-style dataset over ``(path, label)`` items; a key is ``(epoch, index)`` and gives
    ``(uint8 (3, H, W), label)``, cropped at random (``augment``) or for evaluation."""

    def __init__(self, items: Sequence[tuple[Path, int]], size: tuple[int, int], seed: int,
                 augment: bool) -> None:
        self.items, self.size, self.seed, self.augment = list(items), size, int(seed), bool(augment)

    def __len__(self) -> int:
        return len(self.items)

    def _train(self, im: Image.Image, epoch: int, index: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, epoch, _CROP_STREAM, index])
        h_out, w_out = self.size
        width, height = im.size
        left, top, w, h = train_crop_box(rng, width, height)
        im.draft("RGB", (math.ceil(width * w_out / w), math.ceil(height * h_out / h)))  # JPEG only
        fx, fy = im.size[0] / width, im.size[1] / height
        box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
        out = im.convert("RGB").resize((w_out, h_out), Image.Resampling.BILINEAR, box=box)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out

    def _eval(self, im: Image.Image) -> Image.Image:
        h_out, w_out = self.size
        w_r, h_r = eval_size(*im.size, self.size)
        im.draft("RGB", (w_r, h_r))
        im = im.convert("RGB")
        w_r, h_r = eval_size(*im.size, self.size)
        if im.size != (w_r, h_r):
            im = im.resize((w_r, h_r), Image.Resampling.BILINEAR)
        if w_r < w_out or h_r < h_out:  # an [h, w] far from square: stretch to cover the crop
            im = im.resize((max(w_r, w_out), max(h_r, h_out)), Image.Resampling.BILINEAR)
        left, top = (im.size[0] - w_out) // 2, (im.size[1] - h_out) // 2
        return im.crop((left, top, left + w_out, top + h_out))

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int] | _Failed:
        epoch, index = key
        path, label = self.items[index]
        try:
            im = open_rgb(path, (lambda im: self._train(im, epoch, index)) if self.augment else self._eval)
        except UserError as e:
            return _Failed(str(e))
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous(), label  # (3, H, W)


def _collate(samples: list) -> tuple[torch.Tensor, torch.Tensor] | _Failed:
    for s in samples:
        if isinstance(s, _Failed):
            return s
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.int64)


class _Batches:
    """The DataLoader's batch sampler: the loader's index batches of its current epoch, as
    ``(epoch, index)`` keys (read in the main process, so workers need no epoch state)."""

    def __init__(self, loader: StreamLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.loader.current_epoch
        for idx in self.loader.index_batches(epoch):
            yield [(epoch, int(i)) for i in idx]


class StreamLoader:
    """Iterate normalised float32 ``(x, y)`` batches of an image folder decoded on the fly.

    Args:
        items: ``(path, label)`` per example (:func:`fastpc.data.imagefolder.collect_images`).
        image_size: ``(h, w)`` of every batch.
        batch_size: examples per (global) batch.
        seed: base seed of the order and the crops.
        shuffle: random order each epoch (else sequential).
        drop_last: drop the final incomplete batch.
        device: where batches are normalised and returned.
        augment: random-resized crop + flip (else the evaluation resize + center crop).
        mean, std: per-channel normalisation.
        workers: DataLoader worker processes (0: decode in this process).

    Offers what training uses from a loader: ``len()``, :meth:`set_epoch`, iteration,
    :attr:`num_examples` and :meth:`head`; data parallel, :meth:`shard` as BatchLoader's.
    """

    def __init__(self, items: Sequence[tuple[Path, int]], image_size: tuple[int, int], batch_size: int,
                 seed: int = 0, *, shuffle: bool = True, drop_last: bool = False,
                 device: str | torch.device | None = None, augment: bool = False,
                 mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                 workers: int = 0) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise UserError(f"data.workers must be a non-negative integer or auto, got {workers!r}")
        self.rank, self.world = 0, 1
        self.dataset = ImageFolderStream(items, image_size, seed, augment)
        make_generator(seed)  # a bad seed is a UserError here, as for BatchLoader
        self.seed, self.batch_size = int(seed), batch_size
        self.shuffle, self.drop_last, self.augment = bool(shuffle), bool(drop_last), bool(augment)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.workers = workers
        self.epoch = self.current_epoch = 0
        self._loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_Batches(self), num_workers=workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            # fork on Linux whatever the process's default (a spawned process, or Python >= 3.14's
            # forkserver, would start each worker by re-importing torch: seconds per epoch)
            multiprocessing_context="fork" if workers > 0 and sys.platform.startswith("linux") else None)

    def __len__(self) -> int:
        """Batches per epoch (after :meth:`shard`: global batches every process has a part of)."""
        return batches_per_epoch(self.num_examples, self.batch_size, self.drop_last, self.world)

    def shard(self, rank: int, world: int) -> None:
        """Data parallel: yield process ``rank``'s part of every global batch (of ``world``
        processes), cut as :meth:`fastpc.data.BatchLoader.shard` cuts it (``torch.tensor_split``:
        consecutive parts); crops are per example, so they do not depend on the sharding."""
        self.rank, self.world = check_shard(rank, world)

    @property
    def num_examples(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use epoch ``epoch``'s order and crops."""
        self.epoch = int(epoch)

    def index_batches(self, epoch: int) -> Iterator[torch.Tensor]:
        """This rank's example indices of each batch of ``epoch``."""
        n = self.num_examples
        order = shuffled_order(n, self.seed, epoch) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield torch.tensor_split(idx, self.world)[self.rank] if self.world > 1 else idx

    def _normalize(self, xb: torch.Tensor) -> torch.Tensor:
        x = xb.to(self.device, non_blocking=True).to(torch.float32).div_(255.0)
        return x.sub_(self.mean).div_(self.std)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.current_epoch = self.epoch
        self.epoch += 1
        return self._iterate()

    def _iterate(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._loader:
            if isinstance(batch, _Failed):
                raise UserError(batch.message)
            xb, yb = batch
            yield self._normalize(xb), yb.to(self.device, non_blocking=True)

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` examples in stored order, evaluation-transformed: a fixed batch
        (training's energy trace), decoded in this process."""
        data = ImageFolderStream(self.dataset.items[:n], self.dataset.size, self.seed, augment=False)
        samples = [data[(0, i)] for i in range(len(data))]
        batch = _collate(samples) if samples else (torch.empty(0, 3, *self.dataset.size, dtype=torch.uint8),
                                                     torch.empty(0, dtype=torch.int64))
        if isinstance(batch, _Failed):
            raise UserError(batch.message)
        return self._normalize(batch[0]), batch[1].to(self.device)
