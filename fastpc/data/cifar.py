"""CIFAR-10 / CIFAR-100 reader for the official "python version" pickles, loaded safely.

The pickles are read with :class:`SafeUnpickler`, which refuses every global except
the few callables numpy uses to rebuild an array (``_reconstruct``/``_frombuffer``,
``ndarray``, ``dtype``) and ``_codecs.encode`` restricted to latin-1 (used for bytes
in protocol-2 pickles). Anything else, e.g. ``os.system``, raises :class:`UserError`
before it can be called. Decoded arrays must be plain uint8, so object arrays (which
could smuggle further objects) are rejected too.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path

import numpy as np

from fastpc.errors import UserError

from .sources import one_line

__all__ = ["CIFAR_LAYOUT", "SafeUnpickler", "find_cifar_dir", "load_cifar", "safe_load_pickle"]

# name -> (folder, train files, test files, label key, label-names meta file, meta key)
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                "labels", "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels", "meta", "fine_label_names"),
}


def _numpy_helpers() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


def _latin1_encode(obj: str, encoding: str = "utf-8") -> bytes:
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin-1 strings")
    return codecs.encode(obj, "latin1")


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that only resolves numpy's array-rebuilding globals (see module docstring)."""

    _allowed = _numpy_helpers()

    def find_class(self, module: str, name: str):  # noqa: D102
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}") from None

    def persistent_load(self, pid):  # noqa: D102
        raise pickle.UnpicklingError("refusing persistent id")


def safe_load_pickle(path: str | Path) -> object:
    """Load a pickle that may only contain builtins and numpy arrays; UserError otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {one_line(e.strerror or e)}") from None
    try:
        return SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} is not a safe data pickle ({one_line(e)}); expected the official CIFAR "
                        "python batches holding only dicts, lists and numpy arrays") from None
    except Exception as e:  # truncated/garbled data raises many different types
        raise UserError(f"{path} is not a readable pickle ({type(e).__name__}: {one_line(e)}); "
                        "replace it with an intact copy") from None


def find_cifar_dir(folder: Path, name: str, split: str) -> Path | None:
    """The folder holding the batch files for ``split``: ``folder/<cifar-dir>`` or ``folder``."""
    sub, train, test, *_ = CIFAR_LAYOUT[name]
    files = train if split == "train" else test
    for f in (folder / sub, folder):
        if all((f / b).is_file() for b in files):
            return f
    return None


def _str_keys(d: object, path: Path) -> dict:
    if not isinstance(d, dict):
        raise UserError(f"{path} holds a {type(d).__name__}; expected a dict CIFAR batch")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _str_keys(safe_load_pickle(path), path)
    if "data" not in d or label_key not in d:
        raise UserError(f"CIFAR batch {path} lacks key 'data' or {label_key!r} "
                        f"(has {sorted(map(str, d))}); expected an official CIFAR python batch")
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        desc = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
        raise UserError(f"CIFAR batch {path} has data {desc}; expected uint8 [N, 3072]")
    try:
        y = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise UserError(f"CIFAR batch {path} has non-integer {label_key!r}; "
                        "expected a list of class indices") from None
    if len(y) != len(x):
        raise UserError(f"CIFAR batch {path} has {len(x)} images but {len(y)} labels; "
                        "expected the same count")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"CIFAR batch {path} has labels in [{y.min()}, {y.max()}]; "
                        f"expected class indices in [0, {num_classes - 1}]")
    return x.reshape(-1, 3, 32, 32), y


def load_cifar(folder: Path, name: str, split: str, num_classes: int
               ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """Read a CIFAR split: ``(uint8 (N, 3, 32, 32), int64 (N,), class names or None)``."""
    _, train, test, label_key, meta_file, meta_key = CIFAR_LAYOUT[name]
    parts = [_read_batch(folder / b, label_key, num_classes) for b in (train if split == "train" else test)]
    x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    classes = None
    meta = folder / meta_file
    if meta.is_file():
        names = _str_keys(safe_load_pickle(meta), meta).get(meta_key)
        if isinstance(names, list) and len(names) == num_classes:
            classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    return np.ascontiguousarray(x), y, classes
