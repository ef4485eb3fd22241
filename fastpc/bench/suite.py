"""What every accuracy suite (depth, init, il, ep) does before and around its cells: the
machine line its results name, the thread count, the output folder and the command to record."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

__all__ = ["machine", "begin"]


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
