"""What every accuracy suite (depth, init, il, ep, precision) does before and around its cells:
the machine line its results name, the thread count, the output folder and the command to
record, and a timed training epoch."""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["machine", "begin", "fmnist", "train_epoch"]


def machine() -> str:
    """One line naming the machine: OS, architecture and processor, cores, python, torch."""
    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPU cores, "
            f"python {platform.python_version()}, torch {torch.__version__}")


def begin(args: argparse.Namespace, suite: str) -> tuple[Path, str]:
    """Set torch's threads to ``args.threads`` (at least 1), make ``args.out`` and return it
    with the command line that ran the suite (``fastpc bench SUITE`` + its own arguments)."""
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, shlex.join(["fastpc", "bench", suite, *getattr(args, "argv", sys.argv[3:])])


def fmnist(args: argparse.Namespace, seed: int, n_train: int | None = None, n_test: int | None = None):
    """Fashion-MNIST loaders (``args.batch_size``, ``args.data_root``, no augmentation) with the
    training set cut to its first ``n_train`` examples (shuffled by ``seed``) and the test set
    to its first ``n_test``; None keeps a split whole."""
    from fastpc.data import BatchLoader, make_loaders

    ld = make_loaders("fashion-mnist", batch_size=args.batch_size, seed=seed, root=args.data_root,
                      eval_batch_size=1000, augment=False)
    tr, te = ld.train, ld.test
    if n_train:
        tr = BatchLoader(tr.x[:n_train], tr.y[:n_train], args.batch_size, seed, shuffle=True)
    if n_test:
        te = BatchLoader(te.x[:n_test], te.y[:n_test], 1000, seed, shuffle=False)
    return ld._replace(train=tr, test=te)


def train_epoch(learner, loader, epoch: int, after_step: Callable[[], None] | None = None) -> tuple[float, int, bool]:
    """``learner.step`` over ``loader``'s batches of ``epoch`` -> (seconds spent in the steps,
    steps run, whether a loss was not finite: the epoch stops at that step). ``after_step()``
    runs after every step (a learning-rate schedule), outside the timing."""
    loader.set_epoch(epoch)
    spent, steps = 0.0, 0
    for x, y in loader:
        t0 = time.perf_counter()
        loss = float(learner.step(x, y).loss)
        spent += time.perf_counter() - t0
        steps += 1
        if after_step is not None:
            after_step()
        if not math.isfinite(loss):
            return spent, steps, True
    return spent, steps, False
