"""IDX reader (MNIST, Fashion-MNIST, KMNIST files), gzip-compressed or raw."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from fastpc.errors import UserError

from .sources import one_line

__all__ = ["IDX_FILES", "find_idx_files", "read_idx", "read_idx_pair"]

# IDX type byte -> numpy dtype (big-endian as stored on disk).
_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# split -> (images, labels) base names; ".gz" is optional on disk.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# torchvision's folder names, so an existing torchvision download is found too.
_TORCHVISION_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}


def _find(folder: Path, base: str) -> Path | None:
    for name in (base + ".gz", base):
        p = folder / name
        if p.is_file():
            return p
    return None


def find_idx_files(folder: Path, name: str, split: str) -> tuple[Path, Path] | None:
    """``(images, labels)`` paths for ``split`` in ``folder`` (or its torchvision ``<Name>/raw``)."""
    folders = [folder]
    if name in _TORCHVISION_DIRS:
        folders.append(folder / _TORCHVISION_DIRS[name] / "raw")
    for f in folders:
        found = [_find(f, base) for base in IDX_FILES[split]]
        if all(found):
            return found[0], found[1]
    return None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` detected by its magic bytes) into a writable native numpy array.

    Validates the magic number, the dimensions and that the payload length equals what the
    header promises; any problem raises :class:`UserError` naming the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read IDX file {path}: {one_line(e.strerror or e)}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"IDX file {path} is a damaged or truncated gzip file ({one_line(e)}); "
                            "replace it with an intact copy") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES or not 1 <= raw[3] <= 4:
        magic = raw[:4].hex() if len(raw) >= 4 else raw.hex() or "<empty>"
        raise UserError(f"IDX file {path} has bad magic number 0x{magic}; expected 0x0000TTNN "
                        "with type TT in 08,09,0b,0c,0d,0e and 1-4 dims NN (an MNIST-style file)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"IDX file {path} is truncated inside its header ({len(raw)} bytes); "
                        "replace it with an intact copy")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_DTYPES[raw[2]])
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise UserError(f"IDX file {path} is {what}: dims {list(dims)} need {expected} bytes, "
                        f"file has {len(raw)}; replace it with an intact copy")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx_pair(images: Path, labels: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check an images/labels pair: ``(uint8 (N, H, W), int64 (N,))``."""
    x = read_idx(images)
    y = read_idx(labels)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise UserError(f"IDX file {images} holds {x.dtype} data of shape {list(x.shape)}; "
                        "expected uint8 images of shape [N, H, W]")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise UserError(f"IDX file {labels} holds {y.dtype} data of shape {list(y.shape)}; "
                        "expected integer labels of shape [N]")
    if len(x) != len(y):
        raise UserError(f"IDX files disagree: {images} has {len(x)} images but {labels} has "
                        f"{len(y)} labels; expected the same count")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"IDX file {labels} has labels in [{y.min()}, {y.max()}]; "
                        f"expected class indices in [0, {num_classes - 1}]")
    return x, y
