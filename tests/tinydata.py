"""A tiny learnable IDX dataset (gzip files, MNIST layout) for fast training tests."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Raw IDX encoding of a uint8 array."""
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_tiny_idx(root: Path, n_train: int = 256, n_test: int = 128, size: int = 8,
                   classes: int = 10, seed: int = 0) -> Path:
    """Write class-template-plus-noise images as gz IDX files into ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(classes, size, size))
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, classes, size=n)
        x = np.clip(templates[y] + rng.normal(0, 60, size=(n, size, size)), 0, 255).astype(np.uint8)
        img_name, lab_name = FILES[split]
        (root / img_name).write_bytes(gzip.compress(idx_bytes(x)))
        (root / lab_name).write_bytes(gzip.compress(idx_bytes(y.astype(np.uint8))))
    return root


def tiny_overrides(data_root: Path, out: Path, **extra) -> list[str]:
    """``--set`` items for a fast run on the tiny dataset."""
    sets = {
        "data.name": "mnist", "data.root": str(data_root), "data.download": False,
        "data.batch_size": 32, "data.eval_batch_size": 64,
        "model.width": 16, "model.depth": 3, "learner.iters": 3, "learner.state_lr": 0.1,
        "optim.lr": 0.01, "optim.schedule": "none", "train.progress": False, "train.out": str(out),
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def interrupt_evaluate(monkeypatch, n: int):
    """Make ``fastpc.train.evaluate`` raise KeyboardInterrupt on its ``n``-th call, before it runs
    (a kill after training epoch ``n``, before its evaluation and checkpoint); returns the real
    ``evaluate`` to put back."""
    import fastpc.train as train_mod

    real = train_mod.evaluate
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", interrupted)
    return real


def have_fashion_mnist() -> bool:
    """Whether the real Fashion-MNIST IDX files are where fastpc looks for them."""
    from fastpc.data import search_paths
    return any(p.is_dir() and any(p.glob("*idx3*")) for p in search_paths("fashion-mnist"))
