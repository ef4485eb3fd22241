"""In-memory, seeded mini-batch loader (no DataLoader workers), batched augmentation, val split.

The whole split lives in one tensor (optionally moved to ``device`` once). Every epoch
draws its order from a ``torch.Generator`` seeded from ``(seed, epoch)``, so resuming
at epoch ``k`` with ``set_epoch(k)`` reproduces exactly the batches of an
uninterrupted run. Augmentation uses an independent generator stream, also seeded
from ``(seed, epoch)``.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastpc.distributed import part
from fastpc.errors import UserError

__all__ = ["BatchLoader", "make_generator", "shuffled_order", "batches_per_epoch", "check_shard", "random_crop_flip",
           "split_indices"]

_STREAM_ORDER, _STREAM_AUGMENT, _STREAM_VAL_SPLIT = 0, 1, 2


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def make_generator(seed: int, epoch: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by mixing ``(seed, epoch, stream)`` (numpy SeedSequence)."""
    state = np.random.SeedSequence([_check_seed(seed), int(epoch), int(stream)]).generate_state(2, np.uint32)
    g = torch.Generator()
    g.manual_seed((int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1))
    return g


def shuffled_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of ``range(n)`` for epoch ``epoch``: drawn from ``(seed, epoch)`` only,
    so every process of a data-parallel run and a resumed run draw the same."""
    return torch.randperm(n, generator=make_generator(seed, epoch, _STREAM_ORDER))


def batches_per_epoch(n: int, batch_size: int, drop_last: bool, world: int = 1) -> int:
    """Global batches of ``n`` examples per epoch; over ``world`` processes a last batch with
    fewer examples than processes is dropped (some would get none)."""
    if world > 1 and not drop_last and 0 < n % batch_size < world:
        return n // batch_size
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def check_shard(rank: object, world: object) -> tuple[int, int]:
    """``(rank, world)`` of a data-parallel process, or ``ValueError`` unless 0 <= rank < world."""
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"shard needs 0 <= rank < world, got rank={rank!r}, world={world!r}")
    return rank, world


def split_indices(n: int, val_split: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministically split ``range(n)`` into sorted ``(train_idx, val_idx)``; ``val_split`` in [0, 1)."""
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not 0 <= val_split < 1:
        raise UserError(f"data.val_split must be a number in [0, 1), got {val_split!r}")
    n_val = int(round(val_split * n))
    if val_split > 0 and not 0 < n_val < n:
        raise UserError(f"data.val_split={val_split} leaves {n_val} of {n} examples for validation; "
                        "expected a fraction giving at least one example to each side")
    perm = torch.randperm(n, generator=make_generator(seed, 0, _STREAM_VAL_SPLIT))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True,
                     fill: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Batched random crop (pad by ``padding``, crop back to H x W) and horizontal flip.

    ``fill`` is the per-channel padding value (default 0); use ``-mean/std`` to pad with
    black in normalised space. Random numbers come from the CPU ``generator``, so results
    are identical on every device.
    """
    b, c, h, w = x.shape
    out = x
    if padding > 0:
        p = padding
        if fill is None:
            xp = F.pad(x, (p, p, p, p))
        else:
            fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
            xp = fill_t.expand(b, c, h + 2 * p, w + 2 * p).clone()
            xp[:, :, p:p + h, p:p + w] = x
        oy = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        bi = torch.arange(b, device=x.device)[:, None, None]
        out = xp.permute(0, 2, 3, 1)[bi, rows, cols].permute(0, 3, 1, 2).contiguous()
    if flip:
        f = (torch.rand(b, generator=generator) < 0.5).to(x.device).view(b, 1, 1, 1)
        out = torch.where(f, out.flip(3), out)
    return out


class BatchLoader:
    """Iterate ``(x, y)`` mini-batches of an in-memory dataset, reproducibly.

    Args:
        x, y: all inputs ``(N, ...)`` and int64 labels ``(N,)``.
        batch_size: examples per batch.
        seed: base seed; the order of epoch ``e`` depends only on ``(seed, e)``.
        shuffle: random order each epoch (else sequential, as for evaluation).
        drop_last: drop the final incomplete batch (of each class when ``grouped``).
        device: move the whole dataset there once.
        augment: random crop (padding 4) + horizontal flip on each batch.
        fill: per-channel crop padding value (see :func:`random_crop_flip`).
        grouped: batches drawn from few classes: each class is shuffled and cut into
            chunks of ``batch_size // classes_per_batch``; the chunks are shuffled and
            consecutive groups of ``classes_per_batch`` chunks form a batch, so a batch
            holds at most ``classes_per_batch`` classes (exactly one with the default 1).

    Each ``iter()`` uses the current epoch and then advances it by one; call
    :meth:`set_epoch` to choose the epoch explicitly (e.g. when resuming).

    Data parallel: after :meth:`shard` every process draws the same global batches and yields
    its part of each.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0, *,
                 shuffle: bool = True, drop_last: bool = False, device: str | torch.device | None = None,
                 augment: bool = False, fill: Sequence[float] | None = None,
                 grouped: bool = False, classes_per_batch: int = 1) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        if isinstance(classes_per_batch, bool) or not isinstance(classes_per_batch, int) \
                or not 1 <= classes_per_batch <= batch_size:
            raise UserError(f"classes_per_batch must be an integer in [1, batch size {batch_size}], "
                            f"got {classes_per_batch!r}")
        self.seed = _check_seed(seed)
        self.batch_size = int(batch_size)
        self.shuffle, self.drop_last, self.augment = bool(shuffle), bool(drop_last), bool(augment)
        self.grouped, self.classes_per_batch = bool(grouped), classes_per_batch
        self.fill = fill
        self.epoch = 0
        self.rank, self.world = 0, 1
        if device is not None:
            try:
                device = torch.device(device)
                x, y = x.to(device), y.to(device)
            except (RuntimeError, AssertionError, TypeError) as e:
                raise UserError(f"cannot use device {str(device)!r} ({str(e).splitlines()[0]}); "
                                "expected 'cpu' or an available accelerator such as 'cuda'") from None
        self.x, self.y = x, y
        self.device = x.device
        if self.grouped:
            y_cpu = y.cpu()
            self._class_idx = [torch.nonzero(y_cpu == c).flatten() for c in torch.unique(y_cpu).tolist()]
            self._chunk = max(1, self.batch_size // self.classes_per_batch)

    def __len__(self) -> int:
        """Batches per epoch (after :meth:`shard`: global batches every process has a part of)."""
        if self.grouped:
            rnd = math.floor if self.drop_last else math.ceil
            chunks = sum(rnd(len(ix) / self._chunk) for ix in self._class_idx)
            return rnd(chunks / self.classes_per_batch)
        return batches_per_epoch(len(self.x), self.batch_size, self.drop_last, self.world)

    def shard(self, rank: int, world: int) -> None:
        """Data parallel: yield process ``rank``'s part of every global batch (of ``world``
        processes; consecutive parts, sizes differing by at most one, as
        :func:`fastpc.distributed.part` cuts them). Every process draws the same order and
        augmentation from ``(seed, epoch)``, so the parts of all processes together are exactly
        the batches of one process. A last batch with fewer examples than processes is dropped
        (some would get none)."""
        self.rank, self.world = check_shard(rank, world)

    def _part(self, n: int) -> slice:
        return part(n, self.rank, self.world)

    @property
    def num_examples(self) -> int:
        return len(self.x)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use epoch ``epoch``'s order and augmentation."""
        self.epoch = int(epoch)

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` examples as stored, not augmented: a fixed batch (training's energy trace)."""
        return self.x[:n], self.y[:n]

    def _grouped_batches(self, g: torch.Generator) -> list[torch.Tensor]:
        chunks = []
        for ix in self._class_idx:
            ix = ix[torch.randperm(len(ix), generator=g)]
            parts = list(torch.split(ix, self._chunk))
            if self.drop_last and parts and len(parts[-1]) < self._chunk:
                parts.pop()
            chunks += parts
        order = torch.randperm(len(chunks), generator=g).tolist()
        chunks = [chunks[i] for i in order]
        k = self.classes_per_batch
        batches = [torch.cat(chunks[i:i + k]) for i in range(0, len(chunks), k)]
        if self.drop_last and batches and len(chunks) % k:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self._iterate(epoch)

    def _iterate(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        aug_g = make_generator(self.seed, epoch, _STREAM_AUGMENT) if self.augment else None
        if self.grouped:
            g = make_generator(self.seed, epoch, _STREAM_ORDER)
            index_batches = (b.to(self.device) for b in self._grouped_batches(g))
        elif self.shuffle:
            perm = shuffled_order(len(self.x), self.seed, epoch).to(self.device)
            index_batches = (perm[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self)))
        else:
            index_batches = None
        for i in range(len(self)):
            if index_batches is None:
                sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
                xb, yb = self.x[sl], self.y[sl]
            else:
                idx = next(index_batches)
                if self.world > 1 and len(idx) < self.world:
                    continue  # only a grouped epoch's short last batch gets here
                if self.world > 1 and aug_g is None:  # gather this process's part only
                    idx = idx[self._part(len(idx))]
                xb, yb = self.x[idx], self.y[idx]
            if aug_g is not None:  # drawn for the whole batch: the same numbers as one process
                xb = random_crop_flip(xb, aug_g, padding=4, flip=True, fill=self.fill)
            if self.world > 1 and (index_batches is None or aug_g is not None):
                part = self._part(len(yb))
                xb, yb = xb[part], yb[part]
            yield xb, yb
